"""Train edgeprism's default model: a small Qwen3-MoE language model, from scratch.

It uses transformers' own Qwen3MoeConfig / Qwen3MoeForCausalLM so the result is an ordinary
Hugging Face checkpoint that any loader (and edgeprism's own engine) can read. Input is the
output of scripts/build_corpus.py.

Training is resumable: the full state (fp32 weights, optimizer, step, RNG) goes to --ckpt every
--ckpt-every steps and whenever --time-budget-s is about to run out; running the same command
again continues from there. The batches depend only on (--seed, step), so a resumed run sees
exactly the batches an uninterrupted run would have.

Exit status: 0 when the model was exported to --out, 75 when the time budget ran out first
(the checkpoint is saved; re-run the same command to continue).

Example (GPU box):
    python scripts/train_default.py --data data --out data/default_model --ckpt data/ckpt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

EOS = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXIT_INCOMPLETE = 75  # EX_TEMPFAIL: "try again", which is exactly what resuming means
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_TOTAL_BYTES = 40_000_000
SAMPLE_PROMPTS = (
    "The meaning of the word",
    "Python is a programming language that",
    "def read_lines(path):\n",
    "Honor, n.",
    "The read() system call",
)
# Arguments that define the training trajectory; a checkpoint only resumes under the same values.
TRAJECTORY_ARGS = ("steps", "batch", "seq_len", "lr", "warmup", "min_lr_ratio", "weight_decay",
                   "grad_clip", "aux_coef", "seed")


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data"), help="dir with train.u16, heldout.u16, tokenizer/")
    parser.add_argument("--out", type=Path, required=True, help="final Hugging Face model dir")
    parser.add_argument("--ckpt", type=Path, required=True, help="resumable training state dir")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=64, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=60, help="linear warm-up steps")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss weight")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--time-budget-s", type=float, default=480.0, help="wall-clock budget of this invocation")
    parser.add_argument("--ckpt-every", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-tokens", type=int, default=131072, help="held-out tokens scored at the end")
    parser.add_argument("--sample-tokens", type=int, default=48)
    parser.add_argument("--device", default="auto", help="auto, cuda, cpu, cuda:1 ...")
    parser.add_argument("--experts-impl", default="eager", choices=("eager", "grouped_mm"),
                        help="transformers experts kernel; eager is the portable one")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- model


def build_config(vocab_size: int, eos_id: int, aux_coef: float) -> Qwen3MoeConfig:
    """The shipped architecture: 6 layers, all MoE with 8 experts (top-2), tied embeddings."""
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=384,
        intermediate_size=768,
        norm_topk_prob=True,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        output_router_logits=True,
        router_aux_loss_coef=aux_coef,
    )


def set_experts_impl(model: torch.nn.Module, impl: str) -> None:
    """transformers picks grouped_mm by default; its fp32-under-autocast path is not one we can
    test here, so the eager loop stays the default and grouped_mm is opt-in."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Total and per-token active parameters (2 of 8 experts run per token)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    cfg = model.config
    active = total - experts + experts * cfg.num_experts_per_tok // cfg.num_experts
    return {"total": total, "experts": experts, "active_per_token": active}


# --------------------------------------------------------------------------- data


@dataclass
class TokenData:
    """Training windows: the train stream cut into seq_len chunks (plus one token for the last
    target), visited in a fresh seeded permutation every epoch."""

    tokens: np.ndarray
    seq_len: int
    seed: int
    _perms: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def num_chunks(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)}
        return self._perms[epoch]

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """Rows of seq_len + 1 tokens for this step; a pure function of (seed, step)."""
        rows = []
        for sample in range(step * batch_size, (step + 1) * batch_size):
            epoch, index = divmod(sample, self.num_chunks)
            start = int(self._perm(epoch)[index]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def load_tokens(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=np.uint16, mode="r")


def tokenizer_ids(tokenizer_dir: Path) -> tuple[int, int]:
    """(vocab size, <|endoftext|> id) straight from tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos_id = tok.token_to_id(EOS)
    if eos_id is None:
        raise SystemExit(f"{tokenizer_dir}: tokenizer has no {EOS}")
    return tok.get_vocab_size(), eos_id


# --------------------------------------------------------------------------- training state


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that a resume needs."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # CE per step, for the final-loss figure
    sessions: list[dict[str, object]] = field(default_factory=list)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine from --lr down to --lr * --min-lr-ratio at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices (incl. embeddings and expert tensors) decay, norm gains do not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def trajectory(args: argparse.Namespace) -> dict[str, object]:
    return {name: getattr(args, name) for name in TRAJECTORY_ARGS}


def save_checkpoint(path: Path, model: torch.nn.Module, optim: torch.optim.Optimizer, state: TrainState,
                    args: argparse.Namespace, train_tokens: int) -> None:
    """Atomic: a crash mid-save leaves the previous checkpoint intact."""
    path.mkdir(parents=True, exist_ok=True)
    blob = {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "state": state.__dict__,
        "trajectory": trajectory(args),
        "train_tokens": train_tokens,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = path / "state.pt.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, path / "state.pt")


def load_checkpoint(path: Path, model: torch.nn.Module, optim: torch.optim.Optimizer,
                    args: argparse.Namespace, train_tokens: int) -> TrainState:
    """Resume if a checkpoint exists; refuse one made with a different trajectory or data."""
    file = path / "state.pt"
    if not file.exists():
        return TrainState()
    blob = torch.load(file, map_location="cpu", weights_only=True)
    if blob["trajectory"] != trajectory(args) or blob["train_tokens"] != train_tokens:
        raise SystemExit(f"{file} was made with {blob['trajectory']} on {blob['train_tokens']} tokens; this run "
                         f"asks for {trajectory(args)} on {train_tokens} tokens. Use another --ckpt or the same args.")
    model.load_state_dict(blob["model"])
    optim.load_state_dict(blob["optim"])
    torch.set_rng_state(blob["rng_cpu"])
    if torch.cuda.is_available() and len(blob["rng_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(blob["rng_cuda"])
    return TrainState(**blob["state"])


# --------------------------------------------------------------------------- loop


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; CPU trains in plain fp32 (it is only the smoke test)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, batch: torch.Tensor, lr: float,
               args: argparse.Namespace, device: torch.device) -> tuple[float, float, float]:
    """One optimizer step; returns (cross-entropy, router aux loss, grad norm)."""
    batch = batch.to(device, non_blocking=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    for group in optim.param_groups:
        group["lr"] = lr
    with autocast(device):
        out = model(input_ids=inputs, use_cache=False, output_router_logits=True)
        ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.size(-1)), targets.reshape(-1))
        loss = ce + args.aux_coef * out.aux_loss
    optim.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optim.step()
    return ce.item(), out.aux_loss.item(), grad_norm.item()


def stop_margin_s(budget_s: float) -> float:
    """Time kept free at the end of the budget for the checkpoint, eval and export."""
    return min(60.0, 0.25 * budget_s)


def train(model: torch.nn.Module, optim: torch.optim.Optimizer, data: TokenData, state: TrainState,
          args: argparse.Namespace, device: torch.device, t0: float, train_tokens: int) -> bool:
    """Run steps until --steps or the time budget; returns True when training is complete."""
    model.train()
    tokens_per_step = args.batch * args.seq_len
    step_times: list[float] = []
    while state.step < args.steps:
        mean_step = sum(step_times[-20:]) / len(step_times[-20:]) if step_times else 0.0
        if time.monotonic() - t0 + 2 * mean_step + stop_margin_s(args.time_budget_s) > args.time_budget_s:
            break
        start = time.monotonic()
        lr = lr_at(state.step, args)
        ce, aux, grad_norm = train_step(model, optim, data.batch(state.step, args.batch), lr, args, device)
        if not math.isfinite(ce):
            raise SystemExit(f"loss is {ce} at step {state.step}; lower --lr")
        step_times.append(time.monotonic() - start)
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.train_seconds += step_times[-1]
        state.losses.append(ce)
        if state.step % args.log_every == 0 or state.step == args.steps:
            tok_s = tokens_per_step * len(step_times[-args.log_every:]) / sum(step_times[-args.log_every:])
            print(f"step {state.step}/{args.steps} ce {ce:.4f} aux {aux:.4f} gnorm {grad_norm:.3f} lr {lr:.2e} "
                  f"tok/s {tok_s:,.0f} elapsed {time.monotonic() - t0:.0f}s", flush=True)
        if state.step % args.ckpt_every == 0 and state.step < args.steps:
            save_checkpoint(args.ckpt, model, optim, state, args, train_tokens)
    return state.step >= args.steps


# --------------------------------------------------------------------------- evaluation


def eval_windows(heldout: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """Fixed, non-overlapping windows from the start of heldout.u16 (seq_len + 1 tokens each)."""
    count = min(max_tokens, len(heldout) - 1) // seq_len
    if count == 0:
        raise SystemExit("heldout.u16 is shorter than one window")
    return np.stack([heldout[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)]).astype(np.int64)


@torch.no_grad()
def heldout_perplexity(model: torch.nn.Module, windows: np.ndarray, batch: int, device: torch.device) -> float:
    model.eval()
    total_nll = 0.0
    for start in range(0, len(windows), batch):
        rows = torch.from_numpy(windows[start : start + batch]).to(device)
        with autocast(device):
            logits = model(input_ids=rows[:, :-1], use_cache=False, output_router_logits=False).logits
        total_nll += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1),
                                     reduction="sum").item()
    return math.exp(total_nll / (windows.shape[0] * (windows.shape[1] - 1)))


def unigram_perplexity(train_tokens: np.ndarray, windows: np.ndarray, vocab_size: int) -> float:
    """The floor any real model must beat: add-one-smoothed train unigram on the same targets."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-log_p[windows[:, 1:]].mean()))


@torch.no_grad()
def greedy_samples(model: torch.nn.Module, tokenizer_dir: Path, max_new: int, device: torch.device) -> list[dict[str, str]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        samples.append({"prompt": prompt, "completion": tokenizer.decode(out[0, enc["input_ids"].shape[1]:])})
    return samples


# --------------------------------------------------------------------------- export


def export(model: Qwen3MoeForCausalLM, out: Path, tokenizer_dir: Path) -> None:
    """bf16 safetensors in shards well under 16 MiB, plus the tokenizer files."""
    if out.exists():
        shutil.rmtree(out)
    model.config.output_router_logits = False  # a training-only switch; inference should not pay for it
    model.save_pretrained(out, max_shard_size="12MB")
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)


def expected_keys(config: Qwen3MoeConfig) -> set[str]:
    """The per-expert layout edgeprism reads: model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight", f"{p}.mlp.gate.weight"}
        keys |= {f"{p}.self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
        keys |= {f"{p}.mlp.experts.{e}.{n}.weight" for e in range(config.num_experts)
                 for n in ("gate_proj", "up_proj", "down_proj")}
    return keys


def verify_export(out: Path, config: Qwen3MoeConfig) -> dict[str, object]:
    """Fail loudly if the checkpoint is not the layout or size the package can ship."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    if keys != expected_keys(config):
        raise SystemExit(f"unexpected weight keys: missing {sorted(expected_keys(config) - keys)[:5]}, "
                         f"extra {sorted(keys - expected_keys(config))[:5]}")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    too_big = {n: s for n, s in sizes.items() if s >= MAX_FILE_BYTES}
    if too_big or sum(sizes.values()) > MAX_TOTAL_BYTES:
        raise SystemExit(f"export too large: total {sum(sizes.values())} bytes, files over 16 MiB: {too_big}")
    return {"files": sizes, "total_bytes": sum(sizes.values())}


def reload_exported(out: Path, impl: str, device: torch.device) -> torch.nn.Module:
    """Load the export the way users will: proves it loads, and the samples come from shipped weights."""
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, experts_implementation=impl)
    return model.to(device).eval()


# --------------------------------------------------------------------------- main


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def finish(model: Qwen3MoeForCausalLM, state: TrainState, args: argparse.Namespace, device: torch.device,
           train_tokens: np.ndarray, params: dict[str, int], t0: float) -> None:
    """Evaluate, export, reload, sample and write train_report.json."""
    windows = eval_windows(load_tokens(args.data / "heldout.u16"), args.seq_len, args.eval_tokens)
    ppl = heldout_perplexity(model, windows, args.batch, device)
    unigram = unigram_perplexity(train_tokens, windows, model.config.vocab_size)
    print(f"held-out ppl {ppl:.2f} (unigram baseline {unigram:.2f}) on {windows.shape[0] * args.seq_len} tokens", flush=True)
    config = model.config
    export(model.to("cpu", dtype=torch.bfloat16), args.out, args.data / "tokenizer")
    files = verify_export(args.out, config)
    shipped = reload_exported(args.out, args.experts_impl, device)
    samples = greedy_samples(shipped, args.out, args.sample_tokens, device)
    for sample in samples:
        print(f"--- {sample['prompt']!r} -> {sample['completion']!r}", flush=True)
    tail = state.losses[-50:]
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "seed": args.seed,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_config": json.loads((args.out / "config.json").read_text()),
        "params": params,
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "train_tokens": int(len(train_tokens)),
        "epochs": state.tokens_seen / len(train_tokens),
        "train_seconds": round(state.train_seconds, 1),
        "wall_seconds_total": round(sum(float(s["wall_s"]) for s in state.sessions[:-1]) + time.monotonic() - t0, 1),
        "sessions": state.sessions,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "heldout_ppl": ppl,
        "heldout_eval_tokens": int(windows.shape[0] * args.seq_len),
        "unigram_ppl": unigram,
        "samples": samples,
        "export": files,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]},
    }
    tmp = args.out / "train_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out / "train_report.json")
    print(f"exported {args.out} ({files['total_bytes'] / 1e6:.1f} MB)", flush=True)


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vocab_size, eos_id = tokenizer_ids(args.data / "tokenizer")
    train_tokens = load_tokens(args.data / "train.u16")
    data = TokenData(train_tokens, args.seq_len, args.seed)

    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(build_config(vocab_size, eos_id, args.aux_coef))
    set_experts_impl(model, args.experts_impl)
    model.to(device)
    params = count_params(model)
    optim = make_optimizer(model, args, device)
    state = load_checkpoint(args.ckpt, model, optim, args, len(train_tokens))
    print(f"device {device}, params {params}, train tokens {len(train_tokens):,}, "
          f"{'resuming at step ' + str(state.step) if state.step else 'fresh start'}", flush=True)

    start_step = state.step
    complete = train(model, optim, data, state, args, device, t0, len(train_tokens))
    state.sessions.append({"from_step": start_step, "to_step": state.step, "wall_s": round(time.monotonic() - t0, 1),
                           "device": str(device)})
    save_checkpoint(args.ckpt, model, optim, state, args, len(train_tokens))
    if not complete:
        print(f"time budget reached at step {state.step}/{args.steps}; checkpoint saved to {args.ckpt}. "
              f"Re-run the same command to continue.", flush=True)
        return EXIT_INCOMPLETE
    finish(model, state, args, device, train_tokens, params, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
