"""The demo-model training script: a short run learns, and its checkpoint format is HF Llama."""

import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import demo_model_train_lib as lib  # noqa: E402
import make_demo_data  # noqa: E402
import train_demo_model  # noqa: E402

TINY_MODEL_FLAGS = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                    "--intermediate", "128", "--vocab-size", "600"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """50 steps of a tiny model on tiny data (shared by the tests below)."""
    root = tmp_path_factory.mktemp("demo")
    data, out = root / "data.jsonl", root / "model"
    make_demo_data.write_conversations(seed=1, count=300, out=data)
    old_repeats = train_demo_model.PREFIX_REPEATS_FOR_TOKENIZER
    train_demo_model.PREFIX_REPEATS_FOR_TOKENIZER = 5
    try:
        args = train_demo_model.parse_args([
            "--data", str(data), "--out", str(out), "--steps", "50", "--threads", "1",
            "--batch-size", "8", "--lr", "3e-3", "--time-budget-min", "2", *TINY_MODEL_FLAGS])
        summary = train_demo_model.train(args)
    finally:
        train_demo_model.PREFIX_REPEATS_FOR_TOKENIZER = old_repeats
    return out, summary, data


def test_fifty_steps_reduce_the_loss(trained):
    _, summary, _ = trained
    losses = summary["losses"]
    assert len(losses) == 50
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_directory_is_a_hugging_face_llama(trained):
    out, _, _ = trained
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>" and tokenizer_config["bos_token"] is None
    assert tokenizer_config["add_bos_token"] is False and "chat_template" in tokenizer_config
    generation = json.loads((out / "generation_config.json").read_text())
    assert len(generation["eos_token_id"]) == 2


def _our_model(out: Path) -> lib.LlamaForCausalLM:
    from safetensors.torch import load_file

    config = json.loads((out / "config.json").read_text())
    shape = lib.LlamaShape(**{f: config[f] for f in lib.LlamaShape.__dataclass_fields__})
    model = lib.LlamaForCausalLM(shape)
    state = {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.eval()


def test_transformers_logits_equal_ours(trained):
    transformers = pytest.importorskip("transformers")
    out, _, _ = trained
    theirs = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ours = _our_model(out)
    ids = torch.randint(0, ours.shape.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_shared_prefix_path_equals_full_sequence(trained):
    out, _, _ = trained
    model = _our_model(out)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, model.shape.vocab_size, (17,), generator=gen)
    suffix = torch.randint(0, model.shape.vocab_size, (3, 11), generator=gen)
    full = torch.cat((prefix.expand(3, -1), suffix), dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(suffix, prefix_ids=prefix), model(full)[:, 17:],
                                   atol=1e-4, rtol=1e-4)


def test_tokens_split_cleanly_at_the_shared_prefix(trained):
    from tokenizers import Tokenizer

    from agentcpu.demo.tasks import generate_tasks, task_messages

    out, _, _ = trained
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    prefix = lib.shared_prefix_text()
    for task in generate_tasks(9, 20):
        text = lib.conversation_text(task_messages(task))
        ids, labels = lib.encode_suffix(tokenizer, prefix, text)
        prefix_ids = tokenizer.encode(prefix, add_special_tokens=False).ids
        assert prefix_ids + ids == tokenizer.encode(text, add_special_tokens=False).ids
        supervised = tokenizer.decode([t for t in labels if t != lib.IGNORE_INDEX],
                                      skip_special_tokens=False)
        assert supervised.endswith(task.final_answer + "<|im_end|>")
        assert "<|im_start|>" not in supervised and "<tool_response>" not in supervised


def test_transformers_chat_template_matches_ours(trained):
    transformers = pytest.importorskip("transformers")
    from agentcpu.demo.chat_format import render_chat
    from agentcpu.demo.tasks import TOOL_SCHEMAS, generate_tasks, task_messages

    out, _, _ = trained
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for task in generate_tasks(4, 30):
        messages = task_messages(task)
        for cut in range(2, len(messages) + 1):
            expected = render_chat(messages[:cut], TOOL_SCHEMAS, add_generation_prompt=True)
            got = tokenizer.apply_chat_template(messages[:cut], tools=TOOL_SCHEMAS, tokenize=False,
                                                add_generation_prompt=True)
            assert got == expected


def test_cached_prefix_gives_the_same_logits(trained):
    out, _, _ = trained
    model = _our_model(out)
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, model.shape.vocab_size, (13,), generator=gen)
    suffix = torch.randint(0, model.shape.vocab_size, (2, 9), generator=gen)
    with torch.no_grad():
        cache = model.prefix_cache(prefix)
        torch.testing.assert_close(model(suffix, prefix_kv=cache), model(suffix, prefix_ids=prefix))


def test_init_from_continues_where_training_stopped(trained, tmp_path):
    out, summary, data = trained
    args = train_demo_model.parse_args([
        "--data", str(data), "--out", str(tmp_path / "more"), "--steps", "3", "--threads", "1",
        "--batch-size", "8", "--lr", "1e-4", "--init-from", str(out), *TINY_MODEL_FLAGS])
    more = train_demo_model.train(args)
    assert more["parameters"] == summary["parameters"]
    assert more["losses"][0] < 0.8 * summary["losses"][0]


def test_answer_weight_marks_only_what_follows_a_tool_response(trained):
    from tokenizers import Tokenizer

    from agentcpu.demo.tasks import generate_tasks, task_messages

    out, _, _ = trained
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    prefix = lib.shared_prefix_text()
    seen_tool_task = False
    for task in generate_tasks(11, 20):
        text = lib.conversation_text(task_messages(task))
        ids, labels, weights = lib.encode_weighted_suffix(tokenizer, prefix, text, 4.0)
        assert (ids, labels) == lib.encode_suffix(tokenizer, prefix, text)
        heavy = [t for t, w in zip(ids, weights, strict=True) if w == 4.0]
        if not task.uses_tools:
            assert not heavy
            continue
        seen_tool_task = True
        assert all(lab != lib.IGNORE_INDEX for lab, w in zip(labels, weights, strict=True) if w == 4.0)
        assert tokenizer.decode(heavy, skip_special_tokens=False).endswith(
            task.final_answer + "<|im_end|>")
    assert seen_tool_task


def test_weighted_loss_is_the_plain_mean_under_unit_weights():
    torch.manual_seed(0)
    shape = lib.LlamaShape(vocab_size=50, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = lib.LlamaForCausalLM(shape)
    ids = torch.randint(0, 50, (2, 12))
    labels = ids.clone()
    labels[:, :4] = lib.IGNORE_INDEX
    plain = model.loss(ids, labels)
    assert torch.allclose(model.loss(ids, labels, weights=torch.ones(2, 12)), plain)
    weights = torch.ones(2, 12)
    weights[0, 8:] = 10.0
    assert not torch.allclose(model.loss(ids, labels, weights=weights), plain)


def test_copy_batch_repeats_its_tokens_and_labels_only_the_repeat():
    rng = torch.Generator().manual_seed(3)
    for _ in range(5):
        ids, labels = train_demo_model.copy_batch(4, 100, 10, 5, rng)
        length = (ids.shape[1] - 1) // 2
        assert train_demo_model.COPY_MIN_LEN <= length <= train_demo_model.COPY_MAX_LEN
        assert torch.equal(ids[:, :length], ids[:, length + 1:])
        assert (ids[:, length] == 5).all() and (ids[:, :length] >= 10).all()
        assert (labels[:, : length + 1] == lib.IGNORE_INDEX).all()
        assert torch.equal(labels[:, length + 1:], ids[:, length + 1:])


def test_copy_pretraining_and_auxiliary_copy_loss_run(trained, tmp_path):
    _, summary, data = trained
    args = train_demo_model.parse_args([
        "--data", str(data), "--out", str(tmp_path / "copy"), "--steps", "3", "--threads", "1",
        "--batch-size", "8", "--lr", "1e-3", "--copy-pretrain-steps", "3", "--copy-weight", "0.5",
        "--copy-rows", "4", "--time-budget-min", "1", *TINY_MODEL_FLAGS])
    run = train_demo_model.train(args)
    assert len(run["losses"]) == 3
    assert all(loss == loss and loss > 0 for loss in run["losses"])  # finite, not NaN
    assert (tmp_path / "copy" / "model.safetensors").exists()


@pytest.mark.parametrize("group", [1, 3])
def test_tokenizer_cuts_digit_runs_into_groups(group):
    texts = [f"value {n} and {n * 7}.{n % 100:02d}" for n in range(1000, 3000, 7)] * 3
    tokenizer = lib.train_tokenizer(texts, 600, digit_group=group)
    pieces = tokenizer.encode("result 1234567.89 units").tokens
    digits = [p for p in pieces if p.isdigit()]
    assert "".join(digits) == "123456789"
    assert all(len(p) <= group for p in digits)
    words = [w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str("1234567")]
    assert words == (["123", "456", "7"] if group == 3 else list("1234567"))


def test_transplant_vocabulary_keeps_what_the_model_computes_on_shared_tokens():
    texts = [f"the answer is {n * 13} and the city is Oslo" for n in range(1000)] * 2
    old_tokenizer = lib.train_tokenizer(texts, 400, digit_group=1)
    new_tokenizer = lib.train_tokenizer(texts, 600, digit_group=3)
    torch.manual_seed(0)
    shape = lib.LlamaShape(vocab_size=old_tokenizer.get_vocab_size(), hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1)
    old = lib.LlamaForCausalLM(shape)
    new = lib.transplant_vocabulary(old, old_tokenizer, new_tokenizer)
    assert new.shape.vocab_size == new_tokenizer.get_vocab_size() != shape.vocab_size
    text = "the city is Oslo and the answer is"
    old_enc, new_enc = old_tokenizer.encode(text), new_tokenizer.encode(text)
    assert old_enc.tokens == new_enc.tokens
    with torch.no_grad():
        old_logits = old(torch.tensor([old_enc.ids]))[0]
        new_logits = new(torch.tensor([new_enc.ids]))[0]
    shared = [(old_tokenizer.token_to_id(t), i) for t, i in new_tokenizer.get_vocab().items()
              if old_tokenizer.token_to_id(t) is not None]
    old_ids, new_ids = zip(*shared, strict=True)
    assert torch.allclose(old_logits[:, list(old_ids)], new_logits[:, list(new_ids)], atol=1e-5)
    # a new multi-digit token starts near the mean of its digits' embeddings
    number = new_tokenizer.token_to_id("130")
    assert number is not None and old_tokenizer.token_to_id("130") is None
    digits = [old_tokenizer.token_to_id(d) for d in "130"]
    table = old.model.embed_tokens.weight
    assert torch.allclose(new.model.embed_tokens.weight[number], table[digits].mean(0),
                          atol=0.5 * table.std().item())


def test_oversample_repeats_only_the_named_kinds():
    records = [{"kind": "convert"}, {"kind": "weather"}, {"kind": "days"}]
    weights = train_demo_model.parse_oversample("convert=3, days=2")
    assert weights == {"convert": 3, "days": 2}
    kinds = [r["kind"] for r in train_demo_model.oversample(records, weights)]
    assert kinds == ["convert"] * 3 + ["weather"] + ["days"] * 2
    with pytest.raises(Exception, match="KIND=N"):
        train_demo_model.parse_oversample("convert=0")


def test_encoding_in_worker_processes_gives_the_same_examples(trained):
    """`--workers` forks encoders; their examples must equal the in-process ones, in order."""
    out, _, data = trained
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    records = train_demo_model.load_conversations(data, 60)
    _, prefix_ids, alone = train_demo_model.build_examples(records, 600, print, tokenizer, 2.0)
    _, same_prefix, forked = train_demo_model.build_examples(records, 600, print, tokenizer, 2.0,
                                                             workers=2)
    assert same_prefix == prefix_ids and forked == alone and len(forked) == 60
