"""The command line: every subcommand on tiny models, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from lmforge.cli import main


def run(capsys, *args, stdin=None, monkeypatch=None):
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_generate_greedy_is_deterministic_and_stream_matches(tiny_lm_dirs, capsys):
    d = tiny_lm_dirs["chat"]
    code, out1, _ = run(capsys, "generate", "hello there", "-m", d, "-n", "12")
    assert code == 0 and out1.strip()
    _, out2, _ = run(capsys, "generate", "hello there", "-m", d, "-n", "12", "--stream")
    assert out1 == out2


def test_generate_seed_reproduces(tiny_lm_dirs, capsys):
    d = tiny_lm_dirs["plain"]
    args = ["generate", "one two", "-m", d, "-n", "16", "-t", "1.2", "--top-k", "40", "--top-p", "0.9"]
    outs = [run(capsys, *args, "--seed", s)[1] for s in (3, 3, 4)]
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_prompt_from_file_and_stdin(tiny_lm_dirs, capsys, tmp_path, monkeypatch):
    d = tiny_lm_dirs["plain"]
    (tmp_path / "p.txt").write_text("The quick brown", encoding="utf-8")
    _, from_arg, _ = run(capsys, "generate", "The quick brown", "-m", d, "-n", "8")
    _, from_file, _ = run(capsys, "generate", "-f", tmp_path / "p.txt", "-m", d, "-n", "8")
    _, from_stdin, _ = run(capsys, "generate", "-m", d, "-n", "8", stdin="The quick brown", monkeypatch=monkeypatch)
    assert from_arg == from_file == from_stdin


def test_shots_appear_in_order_in_the_prompt(tiny_lm_dirs, capsys, tmp_path):
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"input": "sea otter", "output": "loutre de mer"}\n{"input": "dog", "output": "chien"}\n')
    code, _, err = run(capsys, "generate", "cheese", "-m", tiny_lm_dirs["chat"], "-n", "2", "--shots", shots,
                       "--instruction", "Translate to French.", "--show-prompt")
    assert code == 0
    assert err.index("Translate to French.") < err.index("sea otter") < err.index("chien") < err.index("cheese")
    assert "<|im_start|>assistant\nloutre de mer<|im_end|>" in err
    code, _, err = run(capsys, "generate", "cheese", "-m", tiny_lm_dirs["plain"], "-n", "2", "--shots", shots,
                       "--show-prompt")
    assert code == 0 and "Input: sea otter\nOutput: loutre de mer" in err and err.rstrip().endswith(
        "Input: cheese\nOutput:\n--- output ---")


def test_stop_string_is_not_printed(tiny_lm_dirs, capsys):
    d = tiny_lm_dirs["plain"]
    _, full, _ = run(capsys, "generate", "one two", "-m", d, "-n", "20", "--raw")
    full = full.rstrip("\n")
    cut_at = next(i for i in range(3, len(full) - 1) if full[i:i + 2].strip() == full[i:i + 2])
    stop = full[cut_at:cut_at + 2]
    _, cut, _ = run(capsys, "generate", "one two", "-m", d, "-n", "20", "--raw", "--stop", stop)
    assert cut.rstrip("\n") == full[: full.index(stop)]


def test_chat_multi_turn(tiny_lm_dirs, capsys, monkeypatch):
    code, out, _ = run(capsys, "chat", "-m", tiny_lm_dirs["chat"], "-n", "6", "-t", "0", "--system", "Be brief.",
                       stdin="hello\n/reset\nsecond message\n/exit\nnever read\n", monkeypatch=monkeypatch)
    assert code == 0
    assert len(out.splitlines()) == 2  # two replies: one per user line, /reset and /exit are commands


def test_info_on_hf_dir_and_embedded(tiny_lm_dirs, capsys):
    code, out, _ = run(capsys, "info", tiny_lm_dirs["chat"], "--json")
    info = json.loads(out)
    assert code == 0 and info["layers"] == 2 and info["kv_heads"] == 2 and info["context_length"] == 128
    assert info["chat_template"] is True and info["format"] == "huggingface"
    assert info["weights_memory_mb"]["bfloat16"] * 2 == pytest.approx(info["weights_memory_mb"]["float32"], abs=0.2)
    code, out, _ = run(capsys, "info")
    assert code == 0 and "134,515,008" in out and "8192" in out and "Q4_1" in out


def test_info_describes_an_adapter(tiny_lm_dirs, tmp_path, capsys):
    import lmforge
    from lmforge.peft.adapters import save_adapter
    from lmforge.peft.lora import LoraSpec, add_lora

    lm = lmforge.load(tiny_lm_dirs["chat"])
    add_lora(lm.model, LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    save_adapter(lm.model, tmp_path / "ad")
    code, out, _ = run(capsys, "info", tiny_lm_dirs["chat"], "--adapter", str(tmp_path / "ad"), "--json")
    info = json.loads(out)["adapter"]
    # 2 layers x (q: 4x64 + 64x4, v: 4x64 + 32x4) = 2 x (512 + 384)
    assert code == 0 and info["peft_type"] == "LORA" and info["r"] == 4 and info["parameters"] == 1792
    assert info["adapted_layers"] == 4 and info["target_modules"] == ["q_proj", "v_proj"]
    code, out, _ = run(capsys, "info", tiny_lm_dirs["chat"], "--adapter", str(tmp_path / "ad"))
    assert "peft type LORA" in out and "parameters 1,792" in out
    code, _, err = run(capsys, "info", tiny_lm_dirs["chat"], "--adapter", str(tmp_path))
    assert code == 2 and "not an adapter folder" in err


@pytest.mark.parametrize("args,needles", [
    (["generate", "hi", "-m", "no-such-model"], ["unknown model 'no-such-model'"]),
    (["generate", "hi", "-m", "someorg/some-model"], ["hub id", "HF_HUB_OFFLINE"]),
    (["generate", "hi", "--top-p", "1.5"], ["--top-p", "<= 1.0"]),
    (["generate", "hi", "--top-p", "0"], ["--top-p", ">= 1e-06"]),
    (["generate", "hi", "--temperature", "-0.5"], ["--temperature", ">= 0.0"]),
    (["generate", "hi", "--top-k", "0"], ["--top-k", ">= 1"]),
    (["generate", "hi", "-n", "abc"], ["--max-new-tokens", "integer"]),
    (["generate", "hi", "--dtype", "float8"], ["unknown dtype 'float8'"]),
    (["generate", "hi", "--stop", ""], ["stop strings must be non-empty"]),
])
def test_bad_arguments_give_one_line(capsys, tiny_lm_dirs, args, needles):
    if "-m" not in args:
        args = [*args, "-m", str(tiny_lm_dirs["plain"])]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, *needles)


def test_prompt_longer_than_context(tiny_lm_dirs, capsys):
    code, _, err = run(capsys, "generate", "one two three " * 200, "-m", tiny_lm_dirs["plain"], "--raw")
    assert_one_line_error(code, err, "longer than the model's context window of 128 tokens")


def test_chat_without_template(tiny_lm_dirs, capsys):
    code, _, err = run(capsys, "chat", "-m", tiny_lm_dirs["plain"])
    assert_one_line_error(code, err, "has no chat template")
    code, _, err = run(capsys, "generate", "hi", "-m", tiny_lm_dirs["plain"], "--system", "x")
    assert_one_line_error(code, err, "--system needs a chat template")


def test_corrupt_checkpoints(tiny_lm_dirs, capsys, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_lm_dirs["plain"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, _, err = run(capsys, "generate", "hi", "-m", bad)
    assert_one_line_error(code, err, "model.safetensors", "truncated or corrupt")
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 40)
    code, _, err = run(capsys, "generate", "hi", "-m", gguf)
    assert_one_line_error(code, err, "broken.gguf")
    code, _, err = run(capsys, "info", gguf)
    assert_one_line_error(code, err, "broken.gguf")


def test_missing_inputs(tiny_lm_dirs, capsys, tmp_path):
    code, _, err = run(capsys, "generate", "-f", tmp_path / "nope.txt", "-m", tiny_lm_dirs["plain"])
    assert_one_line_error(code, err, "nope.txt", "no such file")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    code, _, err = run(capsys, "generate", "-f", tmp_path / "latin1.txt")
    assert_one_line_error(code, err, "latin1.txt", "not UTF-8")
    (tmp_path / "shots.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": "c"\n')
    code, _, err = run(capsys, "generate", "x", "--shots", tmp_path / "shots.jsonl", "-m", tiny_lm_dirs["plain"])
    assert_one_line_error(code, err, "shots.jsonl", "line 2")


def test_real_process_exit_status_and_no_traceback(tmp_path):
    """The installed entry point, as a user runs it: exit 2 and a single error line."""
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "generate", "hi", "-m", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: unknown model")


def test_generate_with_int8_and_int4_weights(tiny_lm_dirs, capsys):
    d = tiny_lm_dirs["plain"]
    code, out, err = run(capsys, "generate", "one two", "-m", d, "-n", "8", "--quantize", "int8")
    assert code == 0 and out.strip() and "int8 weights, int8 head:" in err
    code, out4, err = run(capsys, "generate", "one two", "-m", d, "-n", "8", "--quantize", "int4")
    assert code == 0 and out4.strip() and "int4 weights, int8 head:" in err
    code, _, err = run(capsys, "generate", "one two", "-m", d, "--quantize", "int3")
    assert_one_line_error(code, err, "--quantize", "invalid choice")
    assert "'int8', 'int4'" in err
