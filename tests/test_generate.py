"""Generation with a K/V cache (``models.generation``, ``tools/generate.py``): greedy output equal
to transformers' ``generate`` token for token, rows of a padded batch as if each ran alone, the
cache equal to recomputing the whole sequence, and sampling that narrows to greedy."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from rank_harness import run_python
from test_hf_format import full_state, unit_scale_model

from models.generation import DecodeState, Sampling, generate
from models.hf_format import save_hf_folder
from models.registry import get_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 300, 42, 8, 9, 100], [77, 3], [1, 2, 3, 4]]  # lengths 7, 2, 4: two rows left-padded
EOS = 511
NEW_TOKENS = 20


def transformers_greedy(folder: Path, prompts: list[list[int]]) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    longest = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=EOS, pad_token_id=EOS)
    rows = [row[longest:].tolist() for row in out]
    return [row[:row.index(EOS) + 1] if EOS in row else row for row in rows]


# Llama, Mistral, Mixtral, and the features of Qwen3 (q/k norms, own head size, YaRN, tied output), Qwen2
# (q/k/v biases) with Llama 3.1's RoPE scaling and Qwen3-MoE (unnormalized top-k, a dense first
# layer): exported as each family's own class.
FAMILIES = {
    "llama": ("debug", {}),
    "mistral": ("debug", dict(family="mistral")),
    "mixtral": ("debug-mixtral", {}),
    "qwen3": ("debug", dict(qk_norm=True, attention_head_dim=32, tie_embeddings=True, rope_scaling="yarn",
                            rope_factor=4.0, rope_original_max_seq_len=8)),
    "qwen2": ("debug", dict(qkv_bias=True, rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=8)),
    "qwen3_moe": ("debug-mixtral", dict(qk_norm=True, norm_topk_prob=False, n_dense_layers=1)),
}


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_transformers_generate(family, tmp_path):
    model_name, fields = FAMILIES[family]
    config = get_config(model_name, **fields)
    model = unit_scale_model(config, seed=3)  # O(1) logits: the greedy tokens vary, a wrong one shows
    save_hf_folder(full_state(model), config, tmp_path)
    ours = generate(model, PROMPTS, NEW_TOKENS, EOS)
    assert ours == transformers_greedy(tmp_path, PROMPTS)
    assert len(set(ours[0])) > 3, f"the test needs varied tokens, got {ours[0]}"


def test_each_row_of_a_padded_batch_is_generated_as_if_alone(monkeypatch):
    model = unit_scale_model(get_config("debug"), seed=3)
    batch = generate(model, PROMPTS, NEW_TOKENS, EOS)
    assert batch == [generate(model, [prompt], NEW_TOKENS, EOS)[0] for prompt in PROMPTS]

    # Negative control: padding visible as keys changes the padded rows.
    def advance_seeing_padding(self, fed, positions):
        self.valid[:] = True
        original_advance(self, fed, positions)

    original_advance = DecodeState.advance
    monkeypatch.setattr(DecodeState, "advance", advance_seeing_padding)
    assert generate(model, PROMPTS, NEW_TOKENS, EOS)[1] != batch[1]


@torch.no_grad()
def test_the_cache_equals_recomputing_the_sequence():
    model = unit_scale_model(get_config("debug-moe-v3"), seed=4).eval()
    prompt = PROMPTS[0]
    cached = generate(model, [prompt], 12, EOS)[0]
    sequence = torch.tensor([prompt])
    for _ in range(len(cached)):
        next_token = model(sequence)[0, -1].argmax()
        sequence = torch.cat([sequence, next_token.view(1, 1)], dim=1)
    assert cached == sequence[0, len(prompt):].tolist()


def test_sampling():
    model = unit_scale_model(get_config("debug"), seed=3)
    greedy = generate(model, PROMPTS, 8, EOS)

    def sample(seed, **how):
        return generate(model, PROMPTS, 8, EOS, Sampling(generator=torch.Generator().manual_seed(seed), **how))

    assert sample(0, temperature=1.0, top_k=1) == greedy
    assert sample(0, temperature=1.0, top_p=1e-6) == greedy
    assert sample(1, temperature=1.0) == sample(1, temperature=1.0)
    assert sample(1, temperature=1.0) != sample(2, temperature=1.0)


def test_cli_continues_prompts_from_a_checkpoint(tmp_path):
    train = [sys.executable, "-m", "train", "--steps", "2", "--checkpoint-every", "2", "--seq-len", "32",
             "--global-batch-size", "4", "--output-dir", str(tmp_path / "run")]
    assert run_python(train, capture_output=True, text=True, timeout=300).returncode == 0
    tool = [sys.executable, str(ROOT / "tools" / "generate.py"), str(tmp_path / "run" / "checkpoints")]
    result = run_python([*tool, "--prompt", "ROMEO:", "--prompt", "To be", "--max-new-tokens", "5"],
                        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and "To be" in result.stdout
    bad = run_python([*tool, "--prompt", "x", "--tokenizer", str(tmp_path / "missing.json")],
                     capture_output=True, text=True, timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), bad.stderr


def generate_on_tensor_parallel_ranks(folders: list[str], prompts: list[list[int]]) -> list[list[list[int]]]:
    """Every rank: each folder's model split over a tp mesh of all ranks, greedy from ``prompts``."""
    from torch.distributed.device_mesh import init_device_mesh

    from models.generation import shard_for_decoding
    from models.hf_format import load_hf_weights_, read_hf_config
    from models.registry import build_model

    tp_mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("tp",))
    outputs = []
    for folder in folders:
        with torch.device("meta"):
            model = build_model(read_hf_config(Path(folder)))
        shard_for_decoding(model, tp_mesh)
        model.to_empty(device="cpu")
        load_hf_weights_(model, Path(folder))
        wq = model.layers["0"].attention.wq.weight
        assert wq.to_local().shape[0] * 2 == wq.shape[0], "the heads are split"
        outputs.append(generate(model, prompts, NEW_TOKENS, EOS))
    return outputs


def test_tensor_parallel_generation_equals_one_process(tmp_path):
    """tp=2 (the decoding plan: no sequence parallel, so one-token steps split nothing) gives the
    same tokens as one process; Qwen3's features (tied output, q/k norms) and an MoE included."""
    from rank_harness import run_on_ranks

    folders, expected = [], []
    for family in ("qwen3", "mixtral"):
        model_name, fields = FAMILIES[family]
        config = get_config(model_name, **fields)
        model = unit_scale_model(config, seed=3)
        save_hf_folder(full_state(model), config, tmp_path / family)
        folders.append(str(tmp_path / family))
        expected.append(generate(model, PROMPTS, NEW_TOKENS, EOS))
    assert run_on_ranks(generate_on_tensor_parallel_ranks, 2, folders, PROMPTS) == [expected, expected]


# ---- --sample-every: samples from the model being trained -------------------------------

SAMPLED = dict(dataset="templates", tokenizer="byte", seq_len=32, global_batch_size=8, steps=2, lr=1e-4,
               checkpoint_every=0, sample_every=2, sample_prompt="Once upon", sample_tokens=12)


def train_and_sample(mesh: str, overrides: dict) -> dict:
    """Every rank: 2 steps of the trainer, then its sample and (gathered) weights and buffers."""
    import tempfile

    from train.config import TrainConfig
    from train.loop import apply_gradients, build_trainer, compute_gradients
    from train.parity import full
    from train.sampling import sample_text

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(**{**SAMPLED, **overrides, "mesh": mesh, "output_dir": out})
        t = build_trainer(cfg)
        for _ in range(cfg.steps):
            loss_share, _ = compute_gradients(t)
            apply_gradients(t, t.model.reduce_loss(loss_share))
        sample = sample_text(t.model, t.tokenizer, cfg.sample_prompt, cfg.sample_tokens)
        weights = {n: full(p) for n, p in [*t.model.named_parameters(), *t.model.named_buffers()]}
    return {"sample": sample, "weights": weights, "config": t.model_config}


@pytest.mark.parametrize("mesh, world, family", [("dp=2,tp=2", 4, "qwen3"), ("cp=2,ep=2", 4, "mixtral")])
def test_samples_during_training_equal_generation_from_the_weights(mesh, world, family, tmp_path):
    """A sample on a mesh is the one process's, and both equal models.generation's greedy output
    (with its K/V cache) from the same weights: the cache-free, right-padded forwards are right.
    The run starts from unit-scale weights (--init-from), whose greedy tokens vary."""
    from rank_harness import run_on_ranks

    model_name, fields = FAMILIES[family]
    config = get_config(model_name, **fields)
    save_hf_folder(full_state(unit_scale_model(config, seed=3)), config, tmp_path)
    overrides = {"init_from": str(tmp_path)}

    from models.registry import build_model
    from train.tokenizer import ByteTokenizer

    one = run_on_ranks(train_and_sample, 1, "", overrides)[0]
    sharded = run_on_ranks(train_and_sample, world, mesh, overrides)
    assert {r["sample"] for r in sharded} == {one["sample"]}, "every rank decodes the same sample"
    model = build_model(one["config"])
    missing, unexpected = model.load_state_dict(one["weights"], strict=False)
    assert not unexpected and set(missing) <= {"output.weight"}, "only a tied output has no entry of its own"
    tokenizer = ByteTokenizer()
    prompt = tokenizer.encode(SAMPLED["sample_prompt"])
    expected = generate(model, [prompt], SAMPLED["sample_tokens"], tokenizer.eos_id)[0]
    assert one["sample"] == SAMPLED["sample_prompt"] + tokenizer.decode(expected)
    assert len(set(expected)) > 2, f"the test needs varied tokens, got {expected}"


def test_sampling_options_are_checked():
    from train.config import TrainConfig
    from train.validation import validate

    def error(**options) -> str:
        with pytest.raises(ValueError) as raised:
            validate(TrainConfig(**{**SAMPLED, **options}), 2 if options.get("mesh") else 1)
        return str(raised.value)

    assert "--sample-every with pp=2" in error(mesh="pp=2")
    assert "--sample-prompt applies with --sample-every" in error(sample_every=0)
    assert "needs --sample-prompt" in error(sample_prompt="")
    assert "exceed the model's max_seq_len" in error(sample_tokens=5000)
