"""What loading a checkpoint costs beyond copying it: no compiler stack imported."""

from __future__ import annotations

import subprocess
import sys


def test_loading_a_model_does_not_import_torch_dynamo(checkpoint_dir):
    """nn.Embedding's random init on the meta device imported torch._dynamo, ~2 s of
    every model load; the table is now made empty and filled from the checkpoint. Run
    in a fresh interpreter, where nothing else has imported it."""
    script = (
        "import sys\n"
        "from agentcpu.engine.llm_engine import LLMEngine\n"
        "from agentcpu.models.loading import resolve_engine_config\n"
        f"cfg = resolve_engine_config({str(checkpoint_dir('qwen2'))!r}, dtype='bfloat16',\n"
        "    max_model_len=128, kv_cache_gb=0.01, quant='int4-g32')\n"
        "engine = LLMEngine(cfg)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout + result.stderr
