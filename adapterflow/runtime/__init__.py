"""The training runtime around the adapter library: base models (builtin, local folder, Hub id), datasets, the
training loop with resumable checkpoints, and the run directory that lets every pipeline step restart in a fresh
process. Uses transformers and tokenizers; the adapter library (`adapterflow`) does not import this package."""
