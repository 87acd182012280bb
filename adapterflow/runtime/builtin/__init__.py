"""Files shipped with adapterflow: the tiny Llama config and the synthetic instruction dataset (with its generator)."""
