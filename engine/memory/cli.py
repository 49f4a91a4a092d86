"""``python -m engine memory``: the estimator on the command line (text table or ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from engine.config.schema import FSDP_SHARDING
from engine.errors import ConfigError, LoraLabError
from engine.memory.arch import arch_from_numbers, catalog_ids, load_arch
from engine.memory.estimator import (
    ATTENTION,
    GPUS,
    MemorySettings,
    estimate,
    fits_on_gpus,
    format_table,
    max_batch_or_seq_that_fits,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine memory",
        description="Predict GPU memory of a fine-tuning step, term by term.",
    )
    parser.add_argument("--model",
                        help=f"catalog id ({', '.join(catalog_ids())}), a folder with config.json, 'demo' or a hub id")
    parser.add_argument("--dims", help="instead of --model: hidden,layers,heads,kv_heads,intermediate,vocab")
    parser.add_argument("--method", default="qlora", help="full | lora | qlora | lora8bit")
    # Defaults of None mean "MemorySettings' default" (or the measured comparison's, which trains a short batch).
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--targets", default=None, help="all-linear (default) or comma-separated module names")
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--lora-dropout", type=float, default=None)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; --measure: 48)")
    parser.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    parser.add_argument("--optimizer", default=None, help="default adamw_torch_fused")
    parser.add_argument("--dtype", default=None, help="compute dtype: bfloat16 (default) | float16 | float32")
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--attn", default=None, choices=ATTENTION)
    parser.add_argument("--loss", default=None, choices=("chunked", "full_logits"))
    parser.add_argument("--no-kbit-upcast", action="store_true", help="prepare_model_for_kbit_training is not called")
    parser.add_argument("--padded", action="store_true", help="batches carry padding (attention mask)")
    parser.add_argument("--padding-free", action="store_true",
                        help="padding-free batches: rows flattened into one sequence (TRL padding_free)")
    parser.add_argument("--packing", action="store_true",
                        help="bfd packing (TRL's default strategy): padding-free rows of --seq-len tokens")
    parser.add_argument("--liger", action="store_true",
                        help="Liger kernels (RMSNorm, SwiGLU; fused loss with full_logits)")
    parser.add_argument("--strategy", default=None, choices=("none", "ddp", "fsdp"),
                        help="several GPUs: ddp (replicated) or fsdp (sharded); the estimate is then per GPU")
    parser.add_argument("--processes", type=int, default=None, help="GPUs (processes) in all, with --strategy")
    parser.add_argument("--fsdp-sharding", default=None,
                        choices=FSDP_SHARDING)
    parser.add_argument("--fsdp-offload", action="store_true", help="FSDP keeps parameters and optimizer states "
                        "in CPU memory")
    parser.add_argument("--gpu", default=None,
                        help=f"also report the largest batch and length that fit: {', '.join(GPUS)}")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return parser


def settings_from_args(args: argparse.Namespace, defaults: MemorySettings | None = None) -> MemorySettings:
    """The command line's settings; what it does not give comes from ``defaults``."""
    d = defaults or MemorySettings()
    given = lambda value, default: default if value is None else value
    rank = given(args.rank, d.rank)
    targets = given(args.targets, d.targets)
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return replace(
        d,
        method=args.method,
        rank=rank,
        alpha=args.alpha if args.alpha is not None else (2 * rank if args.rank is not None else d.alpha),
        targets=targets,
        dora=args.dora or d.dora,
        lora_dropout=given(args.lora_dropout, d.lora_dropout),
        batch_size=given(args.batch, d.batch_size),
        seq_len=given(args.seq_len, d.seq_len),
        gradient_checkpointing=False if args.no_grad_ckpt else d.gradient_checkpointing,
        optimizer=given(args.optimizer, d.optimizer),
        compute_dtype=given(args.dtype, d.compute_dtype),
        double_quant=False if args.no_double_quant else d.double_quant,
        attn=given(args.attn, d.attn),
        loss=given(args.loss, d.loss),
        kbit_upcast=False if args.no_kbit_upcast else d.kbit_upcast,
        padded=(args.padded or d.padded) and not (args.padding_free or args.packing),
        padding_free=args.padding_free or args.packing or d.padding_free,
        liger=args.liger or d.liger,
        strategy=given(args.strategy, d.strategy),
        processes=given(args.processes, d.processes),
        fsdp_sharding=given(args.fsdp_sharding, d.fsdp_sharding),
        fsdp_offload=args.fsdp_offload or d.fsdp_offload,
    )


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The estimate for parsed arguments (``python -m engine memory`` without --measure)."""
    try:
        if args.dims:
            numbers = [int(x) for x in args.dims.split(",")]
            if len(numbers) != 6:
                raise ConfigError("--dims", "needs six numbers: hidden,layers,heads,kv_heads,intermediate,vocab.")
            arch = arch_from_numbers(*numbers)
        elif args.model:
            arch = load_arch(args.model)
        else:
            raise ConfigError("--model", "give a catalog id, a model folder, 'demo' or a hub id (or --dims).")
        settings = settings_from_args(args)
        est = estimate(arch, settings)
        extra = {}
        if args.gpu:
            gpu = next((name for name in GPUS if name.lower().startswith(args.gpu.lower())), None)
            if gpu is None:
                raise ConfigError("--gpu", f"'{args.gpu}' is not one of {', '.join(GPUS)}.")
            extra = {
                "gpu": gpu,
                "max_batch_size": max_batch_or_seq_that_fits(arch, settings, gpu, "batch_size"),
                "max_seq_len": max_batch_or_seq_that_fits(arch, settings, gpu, "seq_len"),
            }
    except (LoraLabError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        payload = est.to_dict()
        payload["fits"] = {gpu: row["fits"] for gpu, row in fits_on_gpus(est).items()}
        payload.update(extra)
        print(json.dumps(payload, indent=2))
    else:
        print(format_table(est))
        if extra:
            print(f"on {extra['gpu']}: largest batch {extra['max_batch_size']} at {settings.seq_len} tokens, "
                  f"longest sequence {extra['max_seq_len']} at batch {settings.batch_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
