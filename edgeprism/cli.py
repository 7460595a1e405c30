"""The `edgeprism` command: generate, serve, info, refactor, profile."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from edgeprism.errors import EdgeprismError, InputError


def _count(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face MoE checkpoint directory (default: the embedded model)")
    p.add_argument("--vram-gb", type=float, default=None, help="device memory budget in GB (default: what is free)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--expert-dtype", default=None,
                   help="routed experts stored as bf16, fp16, fp32, int8 or int4 (default: --dtype)")
    p.add_argument("--policy", default="lru", help="expert cache policy: lru, lfu or activation")
    p.add_argument("--max-context", type=int, default=4096, help="tokens of context to reserve KV cache for")
    p.add_argument("--schedule", default="fetch", choices=["fetch", "cpu", "hybrid", "direct"],
                   help="cache misses in decode: copy to the GPU, compute on the CPU, choose per layer, or have "
                   "the GPU read them in place from pinned host RAM (direct)")
    p.add_argument("--cpu-threads", type=int, default=None, help="threads of the CPU expert path (default CPUs − 1)")
    p.add_argument("--cpu-share", type=_cpu_share, default=None, metavar="auto|FRACTION",
                   help="with --schedule direct: the CPU computes part of each layer's misses inside the decode "
                   "graph — 'auto' adapts the share to measured step times, a number in [0, 1] fixes it")
    p.add_argument("--groups", type=int, default=None, help="sub-experts per expert (default 1, or a refactored "
                   "model's own)")


def _cpu_share(text: str) -> float | bool:
    if text == "auto":
        return True
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use 'auto' or a fraction in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction must lie in [0, 1] (or use 'auto')")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeprism", description="Run MoE language models on small GPUs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does (budget split...)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a continuation of a prompt to stdout")
    gen.add_argument("prompt", help="the text to continue")
    _add_load_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stats", action="store_true", help="print cache statistics to stderr at the end")
    gen.add_argument("--quality", type=float, default=None,
                     help="with --schedule hybrid or direct: quality target in (0, 1] "
                     "(perplexity ratio from the profiled table); drops the least important misses")
    gen.add_argument("--latency-ms", type=float, default=None,
                     help="with --schedule hybrid or direct: per-token latency target")

    info = sub.add_parser("info", help="describe a checkpoint and how a VRAM budget would be split")
    info.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded model)")
    info.add_argument("--vram-gb", type=float, default=None, help="show the split of this budget")
    info.add_argument("--dtype", default="bf16", help="dtype the weights would run in (default bf16)")
    info.add_argument("--max-context", type=int, default=4096)
    info.add_argument("--groups", type=int, default=1, help="sub-experts per expert")
    info.add_argument("--expert-dtype", default=None, help="routed experts as bf16, fp16, fp32, int8 or int4")

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs: pip install 'edgeprism[server]')")
    _add_load_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--model-id", default=None, help="the name clients pass as `model` (default: the checkpoint "
                     "directory's name, edgeprism-default for the embedded model)")
    srv.add_argument("--max-queue", type=_count, default=8, help="requests that may wait behind the running one; "
                     "more get HTTP 429")

    prof = sub.add_parser("profile", help="measure quality vs latency at each quality floor (schedule hybrid) and "
                          "save the table beside the model, for generate --quality")
    prof.add_argument("checkpoint", nargs="?", default=None, help="checkpoint directory (same as --model)")
    _add_load_args(prof)
    prof.add_argument("--tokens", type=int, default=256, help="held-out tokens decoded per operating point")
    prof.add_argument("--keeps", type=float, nargs="+", default=None,
                      help="quality floors to measure (kept share of routed mass; default 1 .98 .95 .9 .85 .8)")
    prof.add_argument("--out", default=None, help="where to write the table (default: beside the model)")

    ref = sub.add_parser("refactor", help="split experts into functional sub-experts (offline, no retraining)")
    ref.add_argument("model", help="Hugging Face MoE checkpoint directory")
    ref.add_argument("--out", required=True, help="artifact directory to create (must not exist)")
    ref.add_argument("--groups", type=int, required=True, help="sub-experts per expert; must divide the "
                     "expert intermediate size (an error lists the divisors otherwise)")
    ref.add_argument("--method", default="anneal", choices=["anneal", "genetic", "contiguous", "random", "topbottom"])
    ref.add_argument("--calib", default=None, help="calibration text file (default: the built-in text)")
    ref.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens to use")
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--iters", type=int, default=20000, help="solver swap proposals per expert (deterministic)")
    ref.add_argument("--budget-s", type=float, default=None, help="wall-clock cap on the solver (stops early)")
    ref.add_argument("--always-on", action="store_true", help="group 0 = the most frequently active neurons")
    ref.add_argument("--drop-group", action="store_true", help="group G-1 = the least active neurons, "
                     "skipped whenever keep < 1")
    ref.add_argument("--split", type=float, default=0.5, help="topbottom: fraction of neurons in the top segment")
    ref.add_argument("--device", default="cpu", help="device that runs the calibration text (default cpu)")
    return parser


def _progress_bar():  # noqa: ANN202 - tqdm type
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, desc="loading experts", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return bar, update


def cmd_generate(args: argparse.Namespace) -> int:
    bar, update = _progress_bar()
    engine = _load(args, update)
    bar.close()
    for piece in engine.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, top_k=args.top_k, seed=args.seed, quality=args.quality,
                               latency_ms=args.latency_ms):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        for key, value in engine.stats().items():
            print(f"{key}: {value}", file=sys.stderr)
    return 0


def _load(args: argparse.Namespace, progress=None, **overrides):  # noqa: ANN001, ANN202
    from edgeprism.api import load

    options = dict(vram_gb=args.vram_gb, device=args.device, dtype=args.dtype, policy=args.policy,
                   expert_dtype=args.expert_dtype, max_context=args.max_context, schedule=args.schedule,
                   cpu_threads=args.cpu_threads, cpu_share=args.cpu_share, groups=args.groups, progress=progress)
    options.update(overrides)
    return load(args.model, **options)


def cmd_profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgeprism.corpus import token_stream
    from edgeprism.schedule.profile import profile_engine
    from edgeprism.schedule.qos import DEFAULT_KEEPS, OperatingPoints

    if args.checkpoint is not None:
        if args.model is not None and args.model != args.checkpoint:
            raise InputError(f"two models given: {args.checkpoint!r} and --model {args.model!r}; give one.")
        args.model = args.checkpoint
    bar, update = _progress_bar()
    engine = _load(args, update, schedule="hybrid", max_context=min(args.max_context, args.tokens + 1))
    bar.close()
    eos = next(iter(sorted(engine.eos_ids)), 0)
    ids = token_stream(engine.tokenizer, args.tokens, eos)
    table = profile_engine(engine, ids, tuple(args.keeps) if args.keeps else DEFAULT_KEEPS)
    path = table.save(Path(args.out) if args.out else OperatingPoints.default_path(engine.path, args.vram_gb))
    print(f"{'keep':>6} {'quality':>8} {'ms/token':>9}")
    for p in table.points:
        print(f"{p.keep:6.3f} {p.quality:8.4f} {p.ms_per_token:9.3f}")
    print(f"wrote {path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from edgeprism.api import resolve_dtype, resolve_model
    from edgeprism.models.checkpoint import Checkpoint
    from edgeprism.moe.quant import make_format
    from edgeprism.runtime.memory import GiB, plan_budget, resident_params

    ckpt = Checkpoint(resolve_model(args.model))
    spec = ckpt.spec
    elem = torch.empty((), dtype=resolve_dtype(args.dtype, torch.device("cpu"))).element_size()
    experts, resident = spec.expert_params, resident_params(spec)
    context = min(args.max_context, spec.max_position)
    print(f"model:        {ckpt.path}")
    print(f"family:       {spec.family}  ({spec.n_layers} layers, {len(spec.moe_layers)} MoE, "
          f"{spec.num_experts} experts, top-{spec.top_k}, hidden {spec.dim}, expert intermediate {spec.moe_intermediate})")
    print(f"parameters:   {(experts + resident) / 1e9:.3f} B total = {experts / 1e9:.3f} B in routed experts "
          f"+ {resident / 1e9:.3f} B resident")
    print(f"bytes ({args.dtype}): experts {experts * elem / GiB:.3f} GiB, rest {resident * elem / GiB:.3f} GiB")
    print(f"context:      {spec.max_position} tokens (model), {context} reserved")
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    unit_bytes = make_format(args.expert_dtype, spec.dim, spec.moe_intermediate // args.groups, dtype).unit_bytes
    if args.vram_gb is not None:
        plan = plan_budget(spec, elem=elem, groups=args.groups, max_context=context, chunk=256,
                           gather_limit=256 * 2**20, vram_bytes=int(args.vram_gb * GiB), unit_bytes=unit_bytes)
        print(f"split:        {plan.describe()}")
    return 0


def cmd_refactor(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgeprism.refactor.run import RefactorOptions, refactor

    options = RefactorOptions(groups=args.groups, method=args.method, seed=args.seed, iters=args.iters,
                              budget_s=args.budget_s, always_on=args.always_on, dropped=args.drop_group,
                              split=args.split, calib_tokens=args.calib_tokens)
    bar = tqdm(total=0, unit="expert", desc=f"refactor ({args.method})", file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        out = refactor(args.model, args.out, options, calib=args.calib, device=args.device, progress=update)
    finally:
        bar.close()
    print(f"wrote {out}; load it with edgeprism.load({str(out)!r}) or --model {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from edgeprism.server import default_model_id, serve
    except ImportError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise EdgeprismError(f"the server needs {e.name}, which is not installed: "
                             "pip install 'edgeprism[server]'") from e
    bar, update = _progress_bar()
    engine = _load(args, update)
    bar.close()
    with engine:
        model_id = args.model_id or default_model_id(engine)
        print(f"edgeprism: serving {model_id!r} on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)",
              file=sys.stderr)
        serve(engine, args.host, args.port, model_id=args.model_id, max_queue=args.max_queue,
              log_level="info" if args.verbose else "warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        commands = {"generate": cmd_generate, "info": cmd_info, "refactor": cmd_refactor, "serve": cmd_serve,
                    "profile": cmd_profile}
        return commands[args.command](args)
    except EdgeprismError as e:
        print(f"edgeprism: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
