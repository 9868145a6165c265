"""Tool-call markers that are special tokens must survive decoding for the parser."""

from agentcpu.demo.runner import DEMO_MODEL_DIR
from agentcpu.tokenizer import Tokenizer
from agentcpu.tools.parsers import tool_markers_are_special as _trigger_is_special
from tests.tokenizer.fixtures import make_bpe_tokenizer_dir


def test_demo_tokenizer_marks_hermes_trigger_special():
    tokenizer = Tokenizer.from_pretrained(DEMO_MODEL_DIR)
    assert _trigger_is_special(tokenizer, "hermes")
    assert not _trigger_is_special(tokenizer, None)


def test_plain_text_trigger_is_not_special(tmp_path):
    tokenizer = Tokenizer.from_pretrained(make_bpe_tokenizer_dir(tmp_path))
    assert _trigger_is_special(tokenizer, "mistral")
    assert _trigger_is_special(tokenizer, "hermes") == (
        tokenizer.token_to_id("<tool_call>") in tokenizer.special_token_ids
    )
