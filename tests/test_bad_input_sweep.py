"""The bad-input sweep (issue 15): every probe runs the real CLI in-process and must end in exactly one
``error: ...`` line with exit status 2 (or exit 0 where the behaviour is defined, with its note), never a
traceback. The results are the table in docs/bad-input.md: a normal run checks that the committed table is up to
date; ``LMFORGE_WRITE_PROBES=1`` rewrites it.

Probe arguments are templates: ``{tmp}`` is the probe's own temporary folder, ``{chat}`` / ``{plain}`` tiny
Llama models with and without a chat template, ``{enc}`` a tiny BERT encoder, ``{file}`` an existing file,
``{denied}`` a folder where nothing can be created (see ``_denied_folder``) and the data files ``{sft}``,
``{pairs}``, ``{labels}``, ``{prompts}``, ``{corpus}``, ``{mc}``.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmforge.cli.main import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
BAD = b"caf\xe9 \xff\xfe"  # Latin-1 bytes: not UTF-8
BAD_ARG = BAD.decode("utf-8", "surrogateescape")  # what Python puts in sys.argv for those bytes


@dataclass(frozen=True)
class Probe:
    what: str  # the fault, in words (the table's first column)
    argv: tuple[str, ...]
    expect: str  # a fragment of the error line (or, for exit 0, of stderr)
    code: int = 2
    stdin: bytes | None = None
    note: str = ""  # why an exit 0 is right, or how the probe is made


def P(what: str, argv: str | list[str], expect: str, **kw) -> Probe:
    return Probe(what, tuple(argv.split() if isinstance(argv, str) else argv), expect, **kw)


def _out_faults(verb: str, argv: str, flag: str = "-o") -> list[Probe]:
    """The output-path faults for one folder-writing verb: an existing file, an existing folder that refuses
    writes, a new folder in one, a path through a file."""
    return [
        P(f"{verb}: {flag} names an existing file", f"{argv} {flag} {{file}}", "is a file, not a folder"),
        P(f"{verb}: {flag} names a folder that refuses writes", f"{argv} {flag} {{denied}}", "cannot write into"),
        P(f"{verb}: {flag} in a folder that refuses writes", f"{argv} {flag} {{denied}}/out", "cannot create"),
        P(f"{verb}: {flag} under a file", f"{argv} {flag} {{file}}/out", "a part of that path is a file"),
    ]


TRAIN = "finetune --train {sft} -m {plain} --steps 1 --batch-size 1 --max-len 32"
DPO = "rlhf dpo --data {pairs} -m {plain} --steps 1 --batch-size 1 --max-len 32"
PPO = "rlhf ppo --prompts {prompts} -m {plain} --reward sweep_reward:strings --steps 1 --batch-size 2 " \
      "--mini-batch-size 2 -n 2 --threads 1"
PRETRAIN = "pretrain -m tiny-llama --corpus {corpus} --steps 1 --batch-size 1 --seq-len 16 --tokenizer {plain}"
GEN = "generate -m {chat} -n 4"
REWARD = "reward train {labels} -m {enc} --text-field text --label-field label"
BIG = str(2**64)
LOG0 = ("the loop reads 0 as 'log nothing'; on the command line that is a run with no metrics.jsonl and "
        "no loss plot, so 1 is the least")

PROBES: list[Probe] = [
    # ---- output path faults, every writing verb
    *_out_faults("pretrain", PRETRAIN),
    *_out_faults("finetune", TRAIN),
    *_out_faults("merge", "merge {tmp}/no-adapter -m {plain}"),
    *_out_faults("eval", "eval {mc} -m {plain} --task multiple_choice --input-field question --choices-field choices "
                         "--answer-field answer"),
    *_out_faults("compare", "compare --data {mc} --task multiple_choice --input-field question --choices-field "
                            "choices --answer-field answer --setting label=a,model={plain}"),
    *_out_faults("reward train", "reward train {labels} -m {enc} --text-field text --label-field label"),
    *_out_faults("rlhf dpo", DPO),
    *_out_faults("tokenizer train", "tokenizer train --corpus {corpus} --vocab-size 300"),
    *_out_faults("rlhf ppo", PPO),
    *_out_faults("export", "export {plain}"),
    P("embed: -o names an existing file", "embed kind -m {enc} -o {file}.jsonl", "already exists; pass --force"),
    P("embed: -o in a folder that refuses writes", "embed kind -m {enc} -o {denied}/v.jsonl", "cannot write"),
    P("embed: -o under a file", "embed kind -m {enc} -o {file}/v.jsonl", "a part of that path is a file"),
    P("embed: -o with a missing parent folder", "embed kind -m {enc} -o {tmp}/new/sub/v.jsonl", "wrote 1 vectors",
      code=0, note="defined: the parent folders are created, as every verb creates its output folder"),
    # ---- text that is not UTF-8
    P("generate: invalid UTF-8 on stdin", GEN, "standard input is not UTF-8 text", stdin=BAD),
    P("generate: invalid UTF-8 in argv", [*GEN.split(), BAD_ARG], "argument 6 is not valid UTF-8"),
    P("generate: --file not UTF-8", f"{GEN} --file {{latin1}}", "not UTF-8 text (byte 3)"),
    P("chat: invalid UTF-8 on stdin", "chat -m {chat} -n 4", "standard input is not UTF-8 text", stdin=BAD),
    P("chat: invalid UTF-8 in argv (--system)", ["chat", "-m", "{chat}", "--system", BAD_ARG],
      "argument 5 is not valid UTF-8", stdin=b"hi\n"),
    P("embed: invalid UTF-8 in argv", ["embed", "-m", "{enc}", BAD_ARG], "argument 4 is not valid UTF-8"),
    P("embed: --file not UTF-8", "embed -m {enc} --file {latin1}", "not UTF-8 text (byte 3)"),
    # ---- broken inputs
    P("config.json with strings for sizes", "generate hi -m {strsizes}", "hidden_size"),
    P("config.json with strings for sizes (info)", "info {strsizes}", "hidden_size"),
    P("config.json with zero attention heads", "generate hi -m {zeroheads}", "n_head must be >= 1"),
    P("PPO reward function returning strings", [*PPO.split(), "-o", "{tmp}/ppo"], "returned a str"),
    # ---- non-finite and absurd numbers, refused at parse time
    P("generate -t nan", f"{GEN} hi -t nan", "--temperature must be a finite number"),
    P("generate -t inf", f"{GEN} hi -t inf", "--temperature must be a finite number"),
    P("generate --repetition-penalty inf", f"{GEN} hi --repetition-penalty inf",
      "--repetition-penalty must be a finite number"),
    P("generate --seed beyond 64 bits", f"{GEN} hi --seed {BIG}", "--seed must be an integer in [0, 2**63)"),
    P("generate -n 1000000000", "generate hi -m {chat} -n 1000000000", "shortened to",
      code=0, note="defined: capped by the model's context, with a one-line note"),
    P("finetune --clip nan", f"{TRAIN} --clip nan -o {{tmp}}/o", "(--clip): must be a finite number"),
    P("finetune --epochs 1e-9", "finetune --train {sft} -m {plain} --epochs 1e-9 -o {tmp}/o", "less than one record"),
    P("finetune --log-every 0", f"{TRAIN} --log-every 0 -o {{tmp}}/o", "(--log-every): must be >= 1", note=LOG0),
    P("finetune --save-every -2", f"{TRAIN} --save-every -2 -o {{tmp}}/o", "(--save-every): must be >= 0"),
    P("finetune --seed beyond 64 bits", f"{TRAIN} --seed {BIG} -o {{tmp}}/o", "(--seed): must be"),
    P("pretrain --clip nan", f"{PRETRAIN} --clip nan -o {{tmp}}/o", "(--clip): must be a finite number"),
    P("pretrain --log-every 0", f"{PRETRAIN} --log-every 0 -o {{tmp}}/o", "(--log-every): must be >= 1", note=LOG0),
    P("pretrain --save-every -2", f"{PRETRAIN} --save-every -2 -o {{tmp}}/o", "(--save-every): must be >= 0"),
    P("pretrain --seed beyond 64 bits", f"{PRETRAIN} --seed {BIG} -o {{tmp}}/o", "(--seed): must be"),
    P("rlhf ppo --kl-coef nan", f"{PPO} --kl-coef nan -o {{tmp}}/o", "(--kl-coef): must be a finite number"),
    P("rlhf ppo --gamma nan", f"{PPO} --gamma nan -o {{tmp}}/o", "(--gamma): must be a finite number"),
    P("rlhf ppo --target-kl nan", f"{PPO} --target-kl nan -o {{tmp}}/o", "(--target-kl): must be a finite number"),
    P("rlhf ppo --clip-range nan", f"{PPO} --clip-range nan -o {{tmp}}/o", "(--clip-range): must be a finite"),
    P("rlhf ppo -t nan", f"{PPO} -t nan -o {{tmp}}/o", "(--temperature): must be a finite number"),
    P("rlhf ppo --save-every -2", f"{PPO} --save-every -2 -o {{tmp}}/o", "(--save-every): must be >= 0"),
    P("rlhf dpo --beta nan", f"{DPO} --beta nan -o {{tmp}}/o", "(--beta): must be a finite number"),
    P("rlhf dpo --epochs 1e-9", "rlhf dpo --data {pairs} -m {plain} --epochs 1e-9 -o {tmp}/o", "less than one pair"),
    P("rlhf dpo --save-every -2", f"{DPO} --save-every -2 -o {{tmp}}/o", "(--save-every): must be >= 0"),
    P("rlhf dpo --seed beyond 64 bits", f"{DPO} --seed {BIG} -o {{tmp}}/o", "(--seed): must be"),
    P("reward train --epochs 1e-9", "reward train {labels} -m {enc} --epochs 1e-9 -o {tmp}/o", "--epochs: expected an integer"),
    P("reward train --seed beyond 64 bits", f"{REWARD} --seed {BIG} -o {{tmp}}/o",
      "(--seed): must be"),
    P("eval -t nan", "eval {mc} -m {plain} -t nan -o {tmp}/o", "must be a finite number"),
    P("eval --seed beyond 64 bits", f"eval {{mc}} -m {{plain}} --seed {BIG} -o {{tmp}}/o", "must be"),
]


# ----------------------------------------------------------------------------- fixtures
def _refuses(folder: Path) -> bool:
    """Whether creating a file and a folder in ``folder`` fails for want of permission (root ignores modes)."""
    for make in (lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)), os.mkdir):
        try:
            make(folder / "lmforge-probe")
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                continue
            return False
        probe = folder / "lmforge-probe"
        probe.rmdir() if probe.is_dir() else probe.unlink()
        return False
    return True


def _denied_folder(tmp: Path) -> tuple[Path | None, str]:
    """An existing, empty folder in which nothing can be created, and how it was found. Not root: a mode 0555
    folder. Root ignores modes, so then an empty folder of the kernel's /sys that refuses new entries, if any."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        folder = tmp / "read-only"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o555)
        return folder, "a mode 0555 folder"
    for folder in sorted(Path("/sys/kernel").glob("*")):
        try:
            if folder.is_dir() and not any(folder.iterdir()) and _refuses(folder):
                return folder, f"running as root, where modes do not deny: {folder} (sysfs refuses new entries)"
        except OSError:
            continue
    return None, "running as root and no empty /sys folder refuses new entries: no folder here denies writes"


@pytest.fixture(scope="module")
def world(tiny_lm_dirs, tmp_path_factory):
    """The files the probes name, built once."""
    import json

    import torch

    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.config import ModelConfig
    from lmforge.models import init_weights
    from lmforge.models.encoder import EncoderModel

    root = tmp_path_factory.mktemp("probes")
    data = root / "data"
    data.mkdir()
    words = ["[PAD]", "[UNK]", "kind", "rude", "the", "very"]
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from lmforge.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[PAD]")
    torch.manual_seed(0)
    config = ModelConfig(family="bert", arch="encoder", n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                         max_seq_len=64, norm="layernorm", norm_eps=1e-12, mlp="gelu_exact", positions="learned",
                         qkv_bias=True, out_bias=True, mlp_bias=True, norm_first=False, type_vocab_size=2,
                         vocab_size=len(words), pooler=True, pad_token_id=0)
    enc = save_hf_dir(init_weights(EncoderModel(config), seed=0), root / "enc", tokenizer=tok)
    broken = {}
    for name, key, value in (("strsizes", "hidden_size", "64"), ("zeroheads", "num_attention_heads", 0)):
        folder = root / name
        folder.mkdir()
        cfg = json.loads((Path(tiny_lm_dirs["plain"]) / "config.json").read_text())
        cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
        for file in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
            (folder / file).write_bytes((Path(tiny_lm_dirs["plain"]) / file).read_bytes())
        broken[name] = str(folder)
    files = {
        "sft": ("sft.jsonl", "".join(json.dumps({"prompt": "one two", "completion": " three"}) + "\n"
                                     for _ in range(4))),
        "pairs": ("pairs.jsonl", "".join(json.dumps({"prompt": "one", "chosen": " two", "rejected": " dog"}) + "\n"
                                         for _ in range(4))),
        "labels": ("labels.csv", "text,label\n" + "".join(f"the very {w},{int(w == 'kind')}\n"
                                                          for w in ["kind", "rude"] * 4)),
        "prompts": ("prompts.txt", "one two\nfour five\n"),
        "corpus": ("corpus.txt", "The quick brown fox jumps over the lazy dog.\n" * 20),
        "mc": ("mc.jsonl", "".join(json.dumps({"question": "one two", "choices": [" three", " dog"], "answer": 0})
                                   + "\n" for _ in range(2))),
        "file": ("a-file", "not a folder\n"),
    }
    paths = {}
    for key, (name, text) in files.items():
        (data / name).write_text(text, encoding="utf-8")
        paths[key] = str(data / name)
    (data / "a-file.jsonl").write_text("{}\n")
    (data / "latin1.txt").write_bytes(BAD + b"\n")
    (data / "sweep_reward.py").write_text("def strings(prompts, completions):\n    return ['good' for _ in completions]\n")
    denied, how = _denied_folder(root)
    return dict(paths, **broken, chat=str(tiny_lm_dirs["chat"]), plain=str(tiny_lm_dirs["plain"]), enc=str(enc),
                latin1=str(data / "latin1.txt"), denied=str(denied) if denied else None,
                denied_how=how, data=str(data))


DENIED: list[str] = []  # how this session made {denied} (the table says which way its rows were made)


def _run(probe: Probe, world: dict, tmp: Path, capsys, monkeypatch) -> tuple[int, str]:
    argv = [a.format(tmp=tmp, **{k: v for k, v in world.items() if k != "denied"}, denied=world["denied"])
            for a in probe.argv]
    if probe.stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(probe.stdin), encoding="utf-8"))
    monkeypatch.syspath_prepend(world["data"])
    monkeypatch.chdir(tmp)
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


FILES = ("sft", "pairs", "labels", "prompts", "corpus", "mc", "file", "latin1", "chat", "plain", "enc", "strsizes",
         "zeroheads")


def _shown(text: str, world: dict, tmp: Path) -> str:
    """A message with this machine's temporary paths replaced by the template names."""
    if world["denied"] is not None:
        text = text.replace(world["denied"], "{denied}")
    for key in (*FILES, "data"):
        text = text.replace(world[key], "{" + key + "}")
    return text.replace(str(tmp), "{tmp}")


RESULTS: dict[str, tuple[int, str]] = {}


@pytest.mark.parametrize("probe", PROBES, ids=[p.what for p in PROBES])
def test_probe(probe, world, tmp_path, capsys, monkeypatch):
    DENIED[:] = [world["denied_how"]]
    if "{denied}" in " ".join(probe.argv) and world["denied"] is None:
        RESULTS[probe.what] = (-1, f"skipped: {world['denied_how']}")
        pytest.skip(world["denied_how"])
    code, err = _run(probe, world, tmp_path, capsys, monkeypatch)
    assert "Traceback" not in err, err
    if probe.code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert code == 2 and len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), (code, err)
        line = errors[0]  # progress lines may come before it (a run that failed on its way), nothing after
    else:
        assert code == probe.code, (code, err)
        notes = [line for line in err.splitlines() if probe.expect in line]
        assert notes, err
        line = notes[0]
    assert probe.expect in line, line
    assert Path(world["file"]).read_text() == "not a folder\n"  # an output path fault changes nothing
    RESULTS[probe.what] = (code, _shown(line, world, tmp_path))


HEADER = """# Bad input: what each probe gets

Generated by `tests/test_bad_input_sweep.py`: every probe runs the real `lmforge` command line in-process and must
end in one `error: ...` line with exit status 2 (or exit 0 where the behaviour is defined: the note says why), never
a traceback. A plain test run fails when a message here changed; `LMFORGE_WRITE_PROBES=1 pytest
tests/test_bad_input_sweep.py` rewrites this file.

`{tmp}` is the probe's own folder, `{chat}` / `{plain}` tiny Llama models with and without a chat template, `{enc}`
a tiny BERT encoder, `{file}` an existing file, `{latin1}` a file of Latin-1 bytes, `{strsizes}` a model folder whose
config.json says `"hidden_size": "64"` (`{zeroheads}`: `"num_attention_heads": 0`); the others are small data files.
"""


def _rows() -> list[str]:
    rows = ["| probe | command | exit | message |", "|---|---|---|---|"]
    for p in PROBES:
        code, message = RESULTS[p.what]
        argv = " ".join(a.replace(BAD_ARG, "<bytes caf\\xe9 \\xff\\xfe>") for a in p.argv)
        if p.stdin is not None:
            argv += " < (bytes caf\\xe9 \\xff\\xfe)"
        message += f" ({p.note})" if p.note else ""
        cells = [p.what, f"`lmforge {argv}`", "skipped" if code < 0 else str(code), message]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def _denied_rows(lines: list[str]) -> list[str]:
    return [line for line in lines if "{denied}" not in line]


def test_table_is_up_to_date():
    """Runs after the probes (later in this file): docs/bad-input.md holds this run's results. Rows of probes in
    ``{denied}`` are compared only when this machine made that folder the same way as the table's."""
    missing = [p.what for p in PROBES if p.what not in RESULTS]
    if missing:
        pytest.skip(f"not every probe ran in this session ({len(missing)} missing, e.g. {missing[0]!r})")
    how = f"`{{denied}}`, a folder in which nothing can be created: {DENIED[0]}."
    table = "\n".join([HEADER, how, "", *_rows()]) + "\n"
    if os.environ.get("LMFORGE_WRITE_PROBES") == "1":
        from lmforge.io import write_text_atomic

        write_text_atomic(DOC, table)
    assert DOC.is_file(), "docs/bad-input.md is missing: run the sweep with LMFORGE_WRITE_PROBES=1"
    old, new = DOC.read_text(encoding="utf-8").splitlines(), table.splitlines()
    if how not in old:  # made another way here (not root, or no /sys): those rows differ by design
        old, new = _denied_rows(old), _denied_rows(new)
    assert old == new, "a probe's message changed: rerun the sweep with LMFORGE_WRITE_PROBES=1 and commit the table"


# ----------------------------------------------------------------------------- --version, warnings, data first
def test_version_prints_the_package_versions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:  # argparse's way out; main() turns it into the status
        from lmforge.cli.main import build_parser

        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"lmforge {version('lmforge')} (torch {version('torch')}, Python "), out
    assert out.count("\n") == 2  # one line per call


def test_warnings_are_one_clean_line(monkeypatch, capsys):
    import warnings

    cli = sys.modules["lmforge.cli.main"]  # (lmforge.cli's ``main`` is the function)

    def warns(a):
        warnings.warn("dropped 3 of 9 examples\nwhose prompt leaves no room", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "cmd_info", warns)
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["info"]) == 0
    assert capsys.readouterr().err == "warning: dropped 3 of 9 examples whose prompt leaves no room\n"
    assert warnings.showwarning is before  # put back once the command ends


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the data file was checked")


DATA_FAULTS = [("missing", None, "does not exist"),
               ("broken.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n', "broken.jsonl"),
               ("fields.jsonl", '{"question": "a"}\n', "fields.jsonl, line 1")]


@pytest.mark.parametrize("name, text, expect", DATA_FAULTS, ids=[d[0] for d in DATA_FAULTS])
@pytest.mark.parametrize("verb", ["finetune", "rlhf dpo", "eval", "compare"])
def test_data_files_are_checked_before_the_model_loads(verb, name, text, expect, tmp_path, monkeypatch, capsys):
    import lmforge.alignment.rlhf as rlhf
    import lmforge.evaluation.harness as harness
    import lmforge.lm

    monkeypatch.setattr(lmforge.lm, "load", _no_model)
    monkeypatch.setattr(rlhf, "load_policy", _no_model)
    monkeypatch.setattr(harness, "load_model", _no_model)
    data = tmp_path / name
    if text is not None:
        data.write_text(text)
    model = str(tmp_path / "model")  # an empty folder: loading it would fail, but nothing gets that far
    (tmp_path / "model").mkdir()
    argv = {"finetune": ["finetune", "--train", str(data), "-m", model, "-o", str(tmp_path / "o")],
            "rlhf dpo": ["rlhf", "dpo", "--data", str(data), "-m", model, "-o", str(tmp_path / "o")],
            "eval": ["eval", str(data), "-m", model, "--input-field", "prompt", "--reference-field", "completion",
                     "-o", str(tmp_path / "o")],
            "compare": ["compare", "--data", str(data), "--input-field", "prompt", "--reference-field", "completion",
                        "--setting", f"label=a,model={model}", "-o", str(tmp_path / "o")]}[verb]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("utf8_mode", ["0", "1"], ids=["strict stdin", "surrogateescape stdin (UTF-8 mode)"])
def test_real_process_refuses_bytes_that_are_not_utf8(utf8_mode, tiny_lm_dirs, tmp_path):
    """The same faults in a real process: stdin bytes (Python decodes them strictly, or with surrogateescape in
    UTF-8 mode and the C locale) and argv bytes (always surrogateescape)."""
    import subprocess

    env = {**os.environ, "PYTHONUTF8": utf8_mode, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "lmforge.cli", "generate", "-m", str(tiny_lm_dirs["chat"]), "-n", "2"]
    stdin = subprocess.run(base, input=BAD, capture_output=True, env=env, timeout=120)
    argv = subprocess.run([*map(os.fsencode, base), BAD], capture_output=True, env=env, timeout=120)
    for proc, expect in ((stdin, b"error: standard input is not UTF-8 text"),
                         (argv, b"error: argument 6 is not valid UTF-8 text")):
        assert proc.returncode == 2 and proc.stderr.startswith(expect), proc.stderr.decode(errors="replace")
        assert proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr


def test_model_config_refuses_wrong_types_naming_the_field():
    from lmforge.config import PRESETS, ModelConfig, preset
    from lmforge.errors import LmforgeError

    for name in PRESETS:  # every preset still builds
        preset(name)
    for field, value, words in [("n_embd", "64", "must be an integer, got '64' (str)"), ("n_layer", 2.0, "integer"),
                                ("norm_eps", float("nan"), "finite number"), ("tie_embeddings", "yes", "true or false"),
                                ("eos_token_id", [1, "2"], "list of integers"), ("n_head", 0, ">= 1"),
                                ("rope_scaling", [], "a mapping"), ("vocab_size", True, "integer")]:
        with pytest.raises(LmforgeError) as e:
            ModelConfig(**{field: value})
        assert str(e.value).startswith(f"config field {field} must be") and words in str(e.value), str(e.value)


def test_embed_output_in_a_folder_without_write_permission_is_refused_before_the_model_loads(tmp_path, monkeypatch,
                                                                                            capsys):
    """Not root: ``os.access`` says the folder refuses new files, so ``embed -o`` stops before loading the encoder
    (as root modes do not deny, so the answer is simulated here; the sweep's {denied} probe is the real case)."""
    import lmforge.lm
    import lmforge.outputs as outputs

    real = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    monkeypatch.setattr(lmforge.lm, "load", _no_model)
    assert main(["embed", "kind", "-m", str(tmp_path / "enc"), "-o", str(tmp_path / "v.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write {tmp_path / 'v.jsonl'}: the folder {tmp_path} does not let you create files "
                   "(permission denied); choose another file name\n"), err
