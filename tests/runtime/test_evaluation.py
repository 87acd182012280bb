"""adapterflow.runtime.evaluation against a direct computation: PEFT's model (the oracle) on the same held-out
examples, the loss summed token by token with torch's cross_entropy, one unpadded example at a time, and a
greedy decode written out by hand. And the gate's rule (adapterflow.runtime.gate)."""

import math

import peft
import pytest
import torch

from adapterflow import LoraConfig, get_adapter_model
from adapterflow.runtime.base_models import load_base_model, load_tokenizer, resolve_base_model
from adapterflow.runtime.data import DataSpec, load_examples, split_examples, tokenize
from adapterflow.runtime.evaluation import evaluation_examples, exact_match_rate, load_model, score
from adapterflow.runtime.gate import decide
from eval_oracle import direct_loss

SEED, FRACTION, MAX_LEN = 3, 0.1, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine: 30x faster than 2 contending threads
    base = resolve_base_model("builtin:tiny-llama")
    model = get_adapter_model(load_base_model(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                init_lora_weights=False))  # random: not the base
    adapter = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(adapter)
    examples = evaluation_examples(DataSpec("builtin:instructions"), FRACTION, SEED)[:40]
    yield base, adapter, examples, load_tokenizer(base)
    torch.set_num_threads(threads)


def test_the_split_is_trainings_held_out_part():
    examples = load_examples(DataSpec("builtin:instructions"))
    assert evaluation_examples(DataSpec("builtin:instructions"), FRACTION, SEED) == \
        split_examples(examples, FRACTION, SEED)[1]


def test_loss_and_perplexity_equal_a_direct_computation(setup):
    base, adapter, examples, tokenizer = setup
    ours_base = score(load_model(base), tokenizer, examples, max_seq_len=MAX_LEN, batch_size=7)
    ours_new = score(load_model(base, adapter_dir=adapter), tokenizer, examples, max_seq_len=MAX_LEN, batch_size=5)
    oracle_base = direct_loss(load_base_model(base), tokenizer, examples, MAX_LEN)
    oracle_new = direct_loss(peft.PeftModel.from_pretrained(load_base_model(base), adapter).eval(), tokenizer,
                             examples, MAX_LEN)
    assert ours_base.loss == pytest.approx(oracle_base, rel=1e-5)
    assert ours_new.loss == pytest.approx(oracle_new, rel=1e-5)
    assert abs(ours_new.loss - ours_base.loss) > 1e-3  # the adapter changes the model: the two are not one number
    assert ours_new.perplexity == pytest.approx(math.exp(oracle_new), rel=1e-5)
    assert ours_base.examples == len(tokenize(examples, tokenizer, MAX_LEN)) > 0
    reused = score(None, tokenizer, examples, max_seq_len=MAX_LEN, batch_size=5, reuse_loss=(1.5, "train-adapter"))
    assert (reused.loss, reused.loss_source, reused.perplexity) == (1.5, "train-adapter", pytest.approx(math.exp(1.5)))


def test_exact_match_equals_a_greedy_decode_by_hand(setup):
    base, adapter, examples, tokenizer = setup
    theirs = peft.PeftModel.from_pretrained(load_base_model(base), adapter).eval()
    hits, pairs = 0, [e for e in examples if e.prompt and e.completion.strip()]
    for example in pairs:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(example.prompt, add_special_tokens=False)
        start = len(ids)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(theirs(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == tokenizer.eos_token_id:
                    break
        text = tokenizer.decode(ids[start:], skip_special_tokens=True)
        hits += " ".join(text.split()) == " ".join(example.completion.split())
    rate, count = exact_match_rate(load_model(base, adapter_dir=adapter), tokenizer, examples, 6, MAX_LEN)
    assert count == len(pairs) > 0 and rate == hits / len(pairs)
    # A model that is right: the completions it generates become the data.
    rows = [type(e)(e.prompt, tokenizer.decode(load_model(base).generate(
        input_ids=torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(e.prompt, add_special_tokens=False)]),
        max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, 1 + len(
            tokenizer.encode(e.prompt, add_special_tokens=False)):], skip_special_tokens=True)) for e in pairs[:3]]
    assert exact_match_rate(load_model(base), tokenizer, rows, 6, MAX_LEN) == (1.0, 3)


@pytest.mark.parametrize("metric, new, base, champion, kwargs, promote, words", [
    ("eval_loss", 1.0, 2.0, None, {}, True, "first version under the alias"),
    ("eval_loss", 2.5, 2.0, None, {}, False, "not better than the base model"),
    ("eval_loss", 2.5, 2.0, None, {"require_better_than_base": False}, True, "first version"),
    ("eval_loss", 1.0, 2.0, 1.2, {"champion_version": "3"}, True, "beats version 3's 1.2 by 0.2"),
    ("eval_loss", 1.2, 2.0, 1.2, {"champion_version": "3"}, False, "not better than version 3's"),  # a tie
    ("eval_loss", 1.1, 2.0, 1.2, {"champion_version": "3", "min_improvement": 0.2}, False, "by at least 0.2"),
    ("perplexity", 3.0, 9.0, 4.0, {"champion_version": "1"}, True, "beats version 1"),
    ("exact_match", 0.5, 0.1, 0.4, {"champion_version": "2"}, True, "beats version 2's 0.4"),  # higher is better
    ("exact_match", 0.3, 0.1, 0.4, {"champion_version": "2"}, False, "not better than version 2's"),
    ("exact_match", None, 0.1, None, {}, False, "no prompt/completion pairs"),
    # Ties within float noise (1e-6 x max(1, |reference|)) keep the holder / fail the base check.
    ("eval_loss", 2.2 - 2.2e-7, 3.0, 2.2, {"champion_version": "5"}, False, "a tie within float noise"),
    ("eval_loss", 2.2 + 2.2e-7, 3.0, 2.2, {"champion_version": "5"}, False, "a tie within float noise"),
    ("eval_loss", 0.5 - 9e-7, 3.0, 0.5, {"champion_version": "5"}, False, "a tie within float noise"),  # below 1
    ("eval_loss", 2.2 - 1e-5, 3.0, 2.2, {"champion_version": "5"}, True, "beats version 5"),  # above the noise
    ("eval_loss", 2.0 - 1e-7, 2.0, None, {}, False, "not better than the base model's 2 (a tie within float"),
    ("perplexity", 1000.0 - 5e-4, 2000.0, 1000.0, {"champion_version": "6"}, False, "a tie"),  # relative above 1
    ("perplexity", 1000.0 - 5e-3, 2000.0, 1000.0, {"champion_version": "6"}, True, "beats version 6"),
    ("eval_loss", 1.0, 2.0, None, {"champion_version": "4", "champion_problem": "no base"}, False, "no base"),
    ("eval_loss", float("nan"), 2.0, None, {}, False, "could not be measured"),
])
def test_the_gate(metric, new, base, champion, kwargs, promote, words):
    decision = decide(metric, new, base, champion, **kwargs)
    assert decision.promote is promote and words in decision.reason, decision.reason
