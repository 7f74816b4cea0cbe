"""Where a verb may write (``lmforge.outputs``): nothing of the user's is ever lost.

Every writing verb refuses a folder that holds other files (exit 2, a message naming the folder and
--force); with --force it writes only its own names and the user's files stay, byte for byte. A training
run folder is refused without --resume or --overwrite; --overwrite removes only the run's own files. A
lock stops a second run in the same folder; a stale one is taken over. ``merge`` never writes over what it
reads; ``compare`` gives distinct labels distinct folders.
"""

import json
import os
import subprocess
import sys

import pytest

import lmforge
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.outputs import LOCK, MANIFEST, RunLock, check_output, claim_output, prepare_output

USER_FILES = {"src/main.py": "print('mine')\n", "notes.txt": "do not lose me\n"}


def user_folder(path):
    """A folder the user made: a source file in a subfolder and a note."""
    for name, text in USER_FILES.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def assert_user_files_kept(path):
    for name, text in USER_FILES.items():
        assert (path / name).read_text() == text, name
    assert not list(path.parent.glob(f".{path.name}.*")), "nothing renamed aside"


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, folder, flag):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(folder) in lines[0] and flag in lines[0], lines[0]


# ----------------------------------------------------------------------------- fixtures
WORDS = ["kind", "lovely", "great", "stupid", "rude", "ugly", "the", "you", "are", "so"]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny random BERT encoder with a word-level tokenizer, as an HF directory."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.config import ModelConfig
    from lmforge.models import init_weights
    from lmforge.models.encoder import EncoderModel
    from lmforge.tokenizer import Tokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[PAD]")
    config = ModelConfig(family="bert", arch="encoder", vocab_size=tok.vocab_size, n_layer=1, n_embd=16, n_head=2,
                         intermediate_size=32, max_seq_len=32, norm="layernorm", norm_eps=1e-12, mlp="gelu_exact",
                         positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, norm_first=False,
                         type_vocab_size=2, pooler=True, pad_token_id=0)
    return save_hf_dir(init_weights(EncoderModel(config), std=0.02, seed=0), tmp_path_factory.mktemp("enc"),
                       tokenizer=tok)


@pytest.fixture
def labelled_csv(tmp_path):
    rows = ["text,label"] + [f'"you are so {w}",{int(w in WORDS[:3])}' for w in WORDS[:6] * 4]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def reward_train(data, out, model, *extra):
    return ("reward", "train", data, "-o", out, "--model", model, "--text-field", "text", "--label-field", "label",
            "--label-map", "0=toxic,1=fine", "--good-labels", "fine", "--batch-size", "8", "--precision", "fp32",
            "--max-len", "8", "--threads", "1", *extra)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 40)
    return path


def pretrain_args(corpus, out, tmp_path, *extra):
    return ("pretrain", "--corpus", corpus, "--out-dir", out, "--steps", "2", "--seq-len", "16", "--batch-size",
            "2", "--eval-batches", "1", "--save-every", "0", "--cache-dir", tmp_path / "cache", "--set", "n_layer=1",
            *extra)


def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Repeat: {w}", "completion": w}) + "\n"
                            for w in ("one", "two", "three", "four")))
    return path


def finetune_args(model, data, out, *extra):
    return ("finetune", "-m", model, "--train", data, "-o", out, "--steps", "1", "--batch-size", "2",
            "--max-len", "16", *extra)


@pytest.fixture
def lora_adapter(tiny_lm_dirs, tmp_path):
    from lmforge.peft.adapters import save_adapter
    from lmforge.peft.lora import LoraSpec, add_lora

    lm = lmforge.load(tiny_lm_dirs["plain"])
    add_lora(lm.model, LoraSpec(r=2, alpha=4, targets=["q_proj"]))
    return save_adapter(lm.model, tmp_path / "adapter")


def eval_data(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": f"one two {i}", "summary": f"three {i}"}) + "\n" for i in range(2)))
    return path


# ----------------------------------------------------------------------------- the policy itself
def test_policy_rules(tmp_path):
    user = user_folder(tmp_path / "mine")
    with pytest.raises(LmforgeError, match=r"mine is not empty .* pass --force"):
        check_output(user, "eval")
    check_output(user, "eval", force=True)
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    with pytest.raises(LmforgeError, match="a.txt is a file, not a folder"):
        check_output(afile, "pretrain", force=True)
    with pytest.raises(LmforgeError, match="is a folder; .* give a file name"):
        check_output(user, "embed", force=True)
    with pytest.raises(LmforgeError, match="a.txt already exists; pass --force"):
        check_output(afile, "embed")
    with pytest.raises(LmforgeError, match="holds no `lmforge finetune` run to continue"):
        check_output(user, "finetune", resume=True)
    with pytest.raises(LmforgeError, match="not both"):
        check_output(user, "finetune", resume=True, overwrite=True)
    # a run folder: refused, continued, or replaced (only the run's own names go)
    run_dir = user_folder(tmp_path / "run")
    prepare_output(run_dir, "finetune", force=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / "final").mkdir()
    (run_dir / "final" / "model.safetensors").write_text("")
    with pytest.raises(LmforgeError, match=r"already holds a `lmforge finetune` run \(final, metrics.jsonl\); "
                                           "pass --resume to continue it or --overwrite"):
        check_output(run_dir, "finetune")
    with pytest.raises(LmforgeError, match="holds a `lmforge finetune` run, not a `lmforge pretrain` run"):
        check_output(run_dir, "pretrain", resume=True)
    check_output(run_dir, "finetune", resume=True)
    prepare_output(run_dir, "finetune", overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [MANIFEST, "notes.txt", "src"]
    assert_user_files_kept(run_dir)


def test_a_failed_start_leaves_no_new_folder(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), claim_output(out, "pretrain"):
        raise RuntimeError("bad corpus")
    assert not out.exists()


# ----------------------------------------------------------------------------- the lock
def test_a_second_run_in_a_locked_folder_is_refused_naming_the_first(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out, "finetune"):
        code, _, err = run(capsys, *pretrain_args(text_file, out, tmp_path))
        assert code == 2 and f"pid {os.getpid()}" in err and "`lmforge finetune`" in err and str(out) in err
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()  # the holder's record is untouched
    assert not (out / LOCK).exists()
    assert run(capsys, *pretrain_args(text_file, out, tmp_path))[0] == 0
    assert not (out / LOCK).exists()


def test_a_lock_held_by_another_process_and_a_stale_one(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lmforge.outputs import RunLock\n"
                               f"with RunLock({str(out)!r}, 'rlhf dpo'):\n    print('held', flush=True)\n"
                               "    time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LmforgeError, match=rf"in use by another run: `lmforge rlhf dpo` \(pid {holder.pid} "):
            RunLock(out, "pretrain").acquire()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, naming a dead pid
        holder.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == holder.pid
    with RunLock(out, "pretrain"):  # the stale lock is taken over
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------- every verb keeps the user's files
def test_reward_train_keeps_the_users_files(tiny_encoder, labelled_csv, tmp_path, capsys):
    out = user_folder(tmp_path / "project")
    code, _, err = run(capsys, *reward_train(labelled_csv, out, tiny_encoder))
    assert_refused(code, err, out, "--force")
    assert_user_files_kept(out)
    assert run(capsys, *reward_train(labelled_csv, out, tiny_encoder, "--force"))[0] == 0
    assert_user_files_kept(out)
    assert (out / "reward_config.json").is_file() and not (out / LOCK).exists()
    from lmforge.alignment.reward import load_reward_model

    assert len(load_reward_model(out).score(["you are so kind"])) == 1
    # its own earlier model: replaced only with --overwrite, and the user's files stay
    code, _, err = run(capsys, *reward_train(labelled_csv, out, tiny_encoder, "--force"))
    assert_refused(code, err, out, "--overwrite")
    assert run(capsys, *reward_train(labelled_csv, out, tiny_encoder, "--overwrite"))[0] == 0
    assert_user_files_kept(out)
    # over its own base model: never
    code, _, err = run(capsys, *reward_train(labelled_csv, tiny_encoder, tiny_encoder, "--force", "--overwrite"))
    assert code == 2 and "would destroy its input" in err


def test_reward_train_to_a_file_is_refused(tiny_encoder, labelled_csv, tmp_path, capsys):
    target = tmp_path / "model.txt"
    target.write_text("mine\n")
    code, _, err = run(capsys, *reward_train(labelled_csv, target, tiny_encoder, "--force"))
    assert_refused(code, err, target, "is a file, not a folder")
    assert target.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "model.txt"]


def test_pretrain_refuses_a_run_without_resume_or_overwrite(tmp_path, text_file, capsys):
    out = user_folder(tmp_path / "run")
    code, _, err = run(capsys, *pretrain_args(text_file, out, tmp_path))
    assert_refused(code, err, out, "--force")
    assert run(capsys, *pretrain_args(text_file, out, tmp_path, "--force"))[0] == 0
    assert_user_files_kept(out)
    metrics = (out / "metrics.jsonl").read_text()
    code, _, err = run(capsys, *pretrain_args(text_file, out, tmp_path, "--force"))
    assert_refused(code, err, out, "--resume")
    assert "--overwrite" in err and (out / "metrics.jsonl").read_text() == metrics  # not truncated
    capsys.readouterr()
    assert run(capsys, *pretrain_args(text_file, out, tmp_path, "--steps", "3", "--resume"))[0] == 0
    assert run(capsys, *pretrain_args(text_file, out, tmp_path, "--overwrite"))[0] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2  # a fresh run, not the resumed one's 3 steps
    assert_user_files_kept(out)
    # the Python API is guarded too
    from lmforge.training.pretrain import PretrainConfig, pretrain

    with pytest.raises(LmforgeError, match="already holds a `lmforge pretrain` run"):
        pretrain(PretrainConfig(corpus=str(text_file), out_dir=out, steps=1, seq_len=16, batch_size=2))


def test_finetune_refuses_a_run_without_resume_or_overwrite(tiny_lm_dirs, tmp_path, capsys):
    data, out = sft_file(tmp_path), user_folder(tmp_path / "run")
    model = tiny_lm_dirs["plain"]
    code, _, err = run(capsys, *finetune_args(model, data, out))
    assert_refused(code, err, out, "--force")
    assert run(capsys, *finetune_args(model, data, out, "--force"))[0] == 0
    assert_user_files_kept(out)
    code, _, err = run(capsys, *finetune_args(model, data, out))
    assert_refused(code, err, out, "--overwrite")
    assert run(capsys, *finetune_args(model, data, out, "--overwrite"))[0] == 0
    assert_user_files_kept(out)
    assert (out / "final" / "config.json").is_file()
    # continuing from the run's own final/ into the same run folder would delete the model it reads
    code, _, err = run(capsys, *finetune_args(out / "final", data, out, "--overwrite"))
    assert code == 2 and "contains the model" in err and (out / "final" / "config.json").is_file()


def test_rlhf_dpo_keeps_the_users_files(tiny_lm_dirs, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}:", "chosen": f" {w}", "rejected": " dog"}) + "\n"
                            for w in ("one", "two", "three", "four")))
    out = user_folder(tmp_path / "run")
    args = ("rlhf", "dpo", "-m", tiny_lm_dirs["plain"], "--data", data, "-o", out, "--steps", "1",
            "--batch-size", "2", "--threads", "1")
    code, _, err = run(capsys, *args)
    assert_refused(code, err, out, "--force")
    assert run(capsys, *args, "--force")[0] == 0
    assert_user_files_kept(out)
    code, _, err = run(capsys, *args)
    assert_refused(code, err, out, "--overwrite")


def test_eval_keeps_the_users_files(tiny_lm_dirs, tmp_path, capsys):
    out = user_folder(tmp_path / "results")
    args = ("eval", eval_data(tmp_path), "-o", out, "-m", tiny_lm_dirs["plain"], "--input-field", "text",
            "--reference-field", "summary", "--metrics", "rouge1", "-n", "2", "--no-progress")
    code, _, err = run(capsys, *args)
    assert_refused(code, err, out, "--force")
    assert run(capsys, *args, "--force")[0] == 0
    assert_user_files_kept(out)
    assert run(capsys, *args)[0] == 0  # its own earlier results are rewritten in place
    assert_user_files_kept(out)


def test_compare_keeps_the_users_files_and_separates_similar_labels(tiny_lm_dirs, tmp_path, capsys):
    out = user_folder(tmp_path / "lab")
    args = ("compare", "--data", eval_data(tmp_path), "-o", out, "--input-field", "text", "--reference-field",
            "summary", "--metrics", "rouge1", "-n", "2", "--no-progress", "--setting",
            f"label=A b,model={tiny_lm_dirs['plain']}", "--setting", f"label=a-b,model={tiny_lm_dirs['plain']},seed=1")
    code, _, err = run(capsys, *args)
    assert_refused(code, err, out, "--force")
    assert run(capsys, *args, "--force")[0] == 0
    assert_user_files_kept(out)
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2 and len({r.casefold() for r in runs}) == 2
    labels = {json.loads((out / "runs" / r / "summary.json").read_text())["settings"]["label"] for r in runs}
    assert labels == {"A b", "a-b"}
    assert run(capsys, *args, "--report-only")[0] == 0  # reads each label's own folder back


def test_tokenizer_train_keeps_the_users_files(tmp_path, text_file, capsys):
    out = user_folder(tmp_path / "tok")
    args = ("tokenizer", "train", "--corpus", text_file, "--kind", "char", "-o", out)
    code, _, err = run(capsys, *args)
    assert_refused(code, err, out, "--force")
    assert run(capsys, *args, "--force")[0] == 0
    assert_user_files_kept(out)
    assert (out / "tokenizer.json").is_file()


def test_embed_refuses_to_replace_a_file_without_force(tiny_encoder, tmp_path, capsys):
    target = tmp_path / "vectors.jsonl"
    target.write_text("mine\n")
    args = ("embed", "you are kind", "-m", tiny_encoder, "-o", target)
    code, _, err = run(capsys, *args)
    assert_refused(code, err, target, "--force")
    assert target.read_text() == "mine\n"
    assert run(capsys, *args, "--force")[0] == 0
    assert json.loads(target.read_text())["text"] == "you are kind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.jsonl"]  # no temporary left behind
    folder = user_folder(tmp_path / "out.npy")
    code, _, err = run(capsys, "embed", "x", "-m", tiny_encoder, "-o", folder, "--force")
    assert_refused(code, err, folder, "is a folder")
    assert_user_files_kept(folder)


def test_merge_keeps_the_users_files_and_never_writes_over_its_inputs(tiny_lm_dirs, lora_adapter, tmp_path, capsys):
    base = tiny_lm_dirs["plain"]
    out = user_folder(tmp_path / "merged")
    code, _, err = run(capsys, "merge", lora_adapter, "-m", base, "-o", out)
    assert_refused(code, err, out, "--force")
    assert run(capsys, "merge", lora_adapter, "-m", base, "-o", out, "--force")[0] == 0
    assert_user_files_kept(out)
    assert lmforge.load(out).generate("one", max_new_tokens=3) == lmforge.load(
        base, adapter=lora_adapter).generate("one", max_new_tokens=3)
    before = {p.name: p.read_bytes() for p in lora_adapter.iterdir()}
    for target in (lora_adapter, lora_adapter / "sub", tmp_path):
        code, _, err = run(capsys, "merge", lora_adapter, "-m", base, "-o", target, "--force")
        assert code == 2 and "the adapter" in err and "--force does not change this" in err, err
    code, _, err = run(capsys, "merge", lora_adapter, "-m", base, "-o", base, "--force")
    assert code == 2 and "the model" in err
    assert {p.name: p.read_bytes() for p in lora_adapter.iterdir()} == before
    lmforge.load(base, adapter=lora_adapter)  # the adapter still loads
