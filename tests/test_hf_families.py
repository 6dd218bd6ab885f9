"""Real Hugging Face families in and out (``models.hf_families``): tiny models that transformers
itself builds and saves load with logits equal to transformers', export back to the family's own
class bit for bit (tied output kept tied), train from ``--init-from`` alone with transformers'
loss at step 1, and every feature they add trains like one process on a mesh."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from rank_harness import run_on_ranks, run_python
from safetensors import safe_open
from safetensors.torch import load_file as load_hf_safetensors
from safetensors.torch import save_file

from models.hf_format import load_hf_folder, save_hf_folder
from models.registry import build_model
from train.hf_export import write_tokenizer_files
from train.parity import assert_same_run, merge_ranks, run_steps

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_TOKENIZER = ROOT / "packages" / "train" / "train" / "assets" / "tokenizer.json"
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=4096, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# name -> (config class, model class, fields beyond SHAPE): each family and each config field that changes the math.
VARIANTS = {
    "llama3.1-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE)),
    "llama3.2-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM",
                          dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3-yarn": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=32, tie_word_embeddings=True, max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                         "original_max_position_embeddings": 32})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0], norm_topk_prob=False,
        head_dim=32)),
}


@torch.no_grad()
def transformers_folder(folder: Path, variant: str, seed: int = 0) -> Path:
    """Save a tiny random model of ``variant`` as transformers does, with the bundled tokenizer.json.
    Weights are drawn at unit scale (O(1) logits, sharp attention and routing) so an error shows."""
    config_class, model_class, fields = VARIANTS[variant]
    config = getattr(transformers, config_class)(**{**SHAPE, **fields})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape))
        else:
            p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    model.save_pretrained(folder)
    shutil.copy(BUNDLED_TOKENIZER, folder / "tokenizer.json")
    return folder


def transformers_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def tokens(length: int = 80) -> torch.Tensor:
    """Longer than the scaled RoPE's original context (32), so the scaling is exercised."""
    return torch.randint(0, SHAPE["vocab_size"], (2, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_logits_equal_transformers_and_export_round_trips(variant, tmp_path):
    folder = transformers_folder(tmp_path / "theirs", variant)
    config, state = load_hf_folder(folder)
    ours = build_model(config).eval()
    ours.load_state_dict(state, strict=False)  # strict=False: a tied output has no entry of its own
    theirs = transformers_model(folder)
    logits = ours(tokens())
    torch.testing.assert_close(logits, theirs(tokens()).logits, atol=1e-4, rtol=0)
    if config.rope_scaling != "none":  # negative control: the scaling matters at this length
        plain = build_model(dataclasses.replace(config, rope_scaling="none")).eval()
        plain.load_state_dict(state, strict=False)
        assert (plain(tokens()) - logits).abs().max() > 1e-2

    out = tmp_path / "ours"
    out.mkdir()
    token_ids = write_tokenizer_files(out, str(folder), str(folder), config.max_seq_len)
    save_hf_folder(state, config, out, extra_config=token_ids)
    back = transformers_model(out)
    assert type(back) is type(theirs), "exported as the family's own class"
    assert back.state_dict().keys() == theirs.state_dict().keys()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    tied = config.tie_embeddings
    assert tied == theirs.config.tie_word_embeddings
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) != tied, "a tied output is stored once"

    # The folder alone: tokenizer, special ids, generation through transformers' pipeline.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|endoftext|>" and back.config.eos_token_id == tokenizer.eos_token_id
    text = transformers.pipeline("text-generation", model=back, tokenizer=tokenizer)(
        "To be, or not", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("To be, or not") and len(text) > len("To be, or not")


def test_unsupported_fields_are_refused_by_name(tmp_path):
    folder = transformers_folder(tmp_path / "base", "qwen3-yarn")
    original = json.loads((folder / "config.json").read_text())
    cases = {
        "model_type 'gemma'": {"model_type": "gemma"},
        "RoPE scaling 'dynamic'": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
        "attention_bias=True": {"attention_bias": True},
        "use_sliding_window=True": {"use_sliding_window": True},
        "hidden_act='gelu'": {"hidden_act": "gelu"},
        r"'yarn' RoPE has \['mscale'\]": {"rope_parameters": {**original["rope_parameters"], "mscale": 0.7}},
    }
    for message, change in cases.items():
        (folder / "config.json").write_text(json.dumps({**original, **change}))
        with pytest.raises(ValueError, match=message):
            load_hf_folder(folder)
    moe = transformers_folder(tmp_path / "moe", "qwen3-moe")
    moe_config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**moe_config, "mlp_only_layers": [1]}))
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\].*dense only the first layers"):
        load_hf_folder(moe)


# ---- --init-from alone: step-1 loss equal to transformers' ------------------------------

def first_steps(folders: list[str], mesh: str, model_args: str = "") -> list[dict]:
    """Every rank: for each folder, a trainer from ``--init-from`` alone and its first step's loss."""
    from train.config import TrainConfig
    from train.loop import build_trainer

    results = []
    for folder in folders:
        cfg = TrainConfig(init_from=folder, mesh=mesh, model_args=model_args, seq_len=32, global_batch_size=4,
                          steps=1, checkpoint_every=0, output_dir=str(Path(folder).parent / f"run-{mesh or 'one'}"))
        t = build_trainer(cfg)
        inputs, labels = next(t.batches)
        loss = t.model.reduce_loss(t.model.forward_backward(inputs, labels))
        t.batches.close()
        results.append({"inputs": inputs, "labels": labels, "loss": loss, "vocab": t.model_config.vocab_size})
    return results


@pytest.mark.parametrize("mesh, world, variants, model_args", [
    ("", 1, list(VARIANTS), ""),
    ("tp=2", 2, ["qwen3-yarn"], ""),
    ("pp=2", 2, ["qwen3-yarn"], ""),  # tied: the last stage's replica reads the embedding (models.tied_output)
    ("pp=2", 2, ["qwen3-yarn"], "tie_embeddings=false"),  # untied: the output starts as a copy of it
])
@torch.no_grad()
def test_init_from_alone_matches_transformers_loss(mesh, world, variants, model_args, tmp_path):
    """No --model, no --tokenizer: the folder defines the model and the tokenizer."""
    folders = [str(transformers_folder(tmp_path / variant / "model", variant)) for variant in variants]
    ranks = run_on_ranks(first_steps, world, folders, mesh, model_args)
    results = next(r for r in ranks[::-1] if r)  # the last pipeline stage holds the batch too
    for variant, folder, ours in zip(variants, folders, results):
        logits = transformers_model(Path(folder))(ours["inputs"]).logits
        theirs = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ours["labels"].flatten()).item()
        assert ours["vocab"] == SHAPE["vocab_size"], "the model came from the folder"
        assert ours["loss"] == pytest.approx(theirs, rel=1e-5), variant


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from train.config import TrainConfig
    from train.validation import validate

    folder = transformers_folder(tmp_path / "model", "qwen2")
    small = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**small, "vocab_size": 1024}))
    weights = load_hf_safetensors(folder / "model.safetensors")
    rewritten = {name: (t[:1024] if t.shape[0] == 4096 else t).clone() for name, t in weights.items()}
    save_file(rewritten, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has 4096 tokens but the model's vocab_size is 1024: pass the model's own "
                                         r"tokenizer with --tokenizer"):
        validate(TrainConfig(init_from=str(folder), output_dir=str(tmp_path / "run")), 1)
    with pytest.raises(ValueError, match=r"--model-args n_layers with --init-from: the folder's weights fix n_layers"):
        validate(TrainConfig(init_from=str(folder), model_args="n_layers=1", output_dir=str(tmp_path / "run")), 1)


# ---- every added feature on a mesh ------------------------------------------------------

QWEN_LIKE = ("qkv_bias=true,qk_norm=true,tie_embeddings=true,attention_head_dim=32,rope_scaling=llama3,"
             "rope_factor=8,rope_original_max_seq_len=16")


@pytest.mark.parametrize("mesh, world, model_args", [
    ("dp=2,tp=2", 4, QWEN_LIKE),
    ("cp=2", 2, QWEN_LIKE),
    ("pp=2", 2, QWEN_LIKE),  # the tied output's replica on the last stage (models.tied_output)
])
def test_added_features_match_single_process(mesh, world, model_args):
    overrides = {"model_args": model_args}
    reference = merge_ranks(run_on_ranks(run_steps, 1, "", overrides))
    assert_same_run(reference, merge_ranks(run_on_ranks(run_steps, world, mesh, overrides)))


def test_qwen3_moe_routing_on_expert_and_tensor_parallel_mesh():
    overrides = {"model": "debug-mixtral", "model_args": "qk_norm=true,norm_topk_prob=false,n_dense_layers=1"}
    reference = merge_ranks(run_on_ranks(run_steps, 1, "", overrides))
    assert_same_run(reference, merge_ranks(run_on_ranks(run_steps, 4, "ep=2,tp=2", overrides)))


# ---- the command line: a hub id, offline from a cache the test fills -------------------

def fill_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded repository."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def test_cli_trains_from_a_hub_id_and_exports_a_folder_transformers_uses(tmp_path):
    fill_hub_cache(tmp_path / "hub", "meshtron-test/tiny-qwen3", transformers_folder(tmp_path / "src", "qwen3-yarn"))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    train = [sys.executable, "-m", "train", "--steps", "2", "--global-batch-size", "2", "--seq-len", "32",
             "--checkpoint-every", "2"]
    run = run_python([*train, "--init-from", "meshtron-test/tiny-qwen3", "--output-dir", str(tmp_path / "run")],
                     capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "tiny-qwen3: " in run.stdout and "tokenizer: " in run.stdout

    export = [sys.executable, str(ROOT / "tools" / "hf_convert.py"), "export", str(tmp_path / "run" / "checkpoints"),
              str(tmp_path / "out")]
    done = run_python(export, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|endoftext|>" and len(tokenizer) == 4096
    generator = transformers.pipeline("text-generation", model=str(out), tokenizer=tokenizer)
    text = generator("To be, or not", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("To be, or not") and len(text) > len("To be, or not")

    missing = run_python([*train, "--init-from", "meshtron-test/absent"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("error: --init-from meshtron-test/absent: not in the hub cache")


# ---- registry names of the real sizes ---------------------------------------------------

# Parameter counts of the released checkpoints (their model cards / safetensors index).
REAL_SIZES = {"llama3.1-8b": 8.03e9, "llama3.2-1b": 1.24e9, "llama3.2-3b": 3.21e9, "mistral-7b": 7.25e9,
              "qwen2.5-0.5b": 0.494e9, "qwen2.5-7b": 7.62e9, "qwen3-0.6b": 0.596e9, "qwen3-8b": 8.19e9,
              "qwen3-32b": 32.8e9, "qwen3-30b-a3b": 30.5e9}


@pytest.mark.parametrize("name", list(REAL_SIZES))
def test_registry_sizes_build_the_same_model_as_transformers(name):
    """Our model and transformers' (from our exported config.json) have the same parameter
    count, matching the released checkpoint's within 1%."""
    from models.hf_format import to_hf_config
    from models.registry import get_config

    config = get_config(name)
    with torch.device("meta"):
        ours = sum(p.numel() for p in build_model(config).parameters())
        hf_config = transformers.AutoConfig.for_model(**to_hf_config(config))
        theirs = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf_config).parameters())
    assert ours == theirs
    assert ours == pytest.approx(REAL_SIZES[name], rel=0.01)


def test_push_and_pull_through_a_local_hub(tmp_path, monkeypatch):
    """``hf_convert.py push`` calls huggingface_hub's create_repo + upload_folder (here recorded into a
    local folder: no network); ``pull`` copies the repository out of the hub cache, offline."""
    import importlib.util

    import huggingface_hub

    spec = importlib.util.spec_from_file_location("hf_convert", ROOT / "tools" / "hf_convert.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    remote = tmp_path / "remote"
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append((repo_id, kw)))

    def upload_folder(self, folder_path, repo_id, commit_message):
        shutil.copytree(folder_path, remote / repo_id)
        return f"https://hub.example/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    folder = transformers_folder(tmp_path / "model", "qwen2")
    cli.main(["push", str(folder), "me/tiny-qwen2", "--private"])
    assert calls == [("me/tiny-qwen2", {"private": True, "exist_ok": True})]
    with pytest.raises(SystemExit, match="error: push .*not a model folder"):
        cli.main(["push", str(tmp_path), "me/x"])
    with pytest.raises(SystemExit, match="error: --push-to nohub: not a hub id"):
        cli.main(["export", str(tmp_path), str(tmp_path / "out"), "--push-to", "nohub"])

    fill_hub_cache(tmp_path / "hub", "me/tiny-qwen2", remote / "me" / "tiny-qwen2")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    pull = [sys.executable, str(ROOT / "tools" / "hf_convert.py"), "pull", "me/tiny-qwen2", str(tmp_path / "pulled")]
    assert run_python(pull, env=env, capture_output=True, text=True, timeout=120).returncode == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "pulled" / name).read_bytes() == (folder / name).read_bytes(), name
        assert not (tmp_path / "pulled" / name).is_symlink()


def test_documents_start_with_the_bos_the_tokenizer_template_adds(tmp_path):
    """Llama 3's tokenizer.json starts every text with <|begin_of_text|> (its post-processor): so do
    our documents (the model saw it at each document start). The bundled tokenizer adds none."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    from train.data_sources import encode_documents
    from train.tokenizer import load_tokenizer

    rust = Tokenizer.from_file(str(BUNDLED_TOKENIZER))
    rust.add_special_tokens(["<|begin_of_text|>"])
    bos = rust.token_to_id("<|begin_of_text|>")
    rust.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    rust.save(str(tmp_path / "tokenizer.json"))
    llama_like, bundled = load_tokenizer(str(tmp_path)), load_tokenizer("default")
    plain = bundled.encode("To be, or not")
    assert llama_like.encode("To be, or not") == [bos, *plain]
    assert list(encode_documents(llama_like, ["To be", "or not"])) == [
        [bos, *bundled.encode("To be"), llama_like.eos_id], [bos, *bundled.encode("or not"), llama_like.eos_id]]
    assert bundled.encode("To be") == rust.encode("To be", add_special_tokens=False).ids, "no BOS without a template"
    assert llama_like.fingerprint != bundled.fingerprint
