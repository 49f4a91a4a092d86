"""``python -m engine memory``: the estimator on the command line (text table or ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys

from engine.errors import ConfigError, LoraLabError
from engine.memory.arch import arch_from_numbers, catalog_ids, load_arch
from engine.memory.estimator import (
    ATTENTION, GPUS, MemorySettings, estimate, fits_on_gpus, format_table, max_batch_or_seq_that_fits,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine memory",
        description="Predict GPU memory of a fine-tuning step, term by term.",
    )
    parser.add_argument("--model", help=f"catalog id ({', '.join(catalog_ids())}), a folder with config.json, 'demo' or a hub id")
    parser.add_argument("--dims", help="instead of --model: hidden,layers,heads,kv_heads,intermediate,vocab")
    parser.add_argument("--method", default="qlora", help="full | lora | qlora | lora8bit")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=None)
    parser.add_argument("--targets", default="all-linear", help="all-linear or comma-separated module names")
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    parser.add_argument("--optimizer", default="adamw_torch_fused")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16 | float16 | float32")
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--attn", default="sdpa", choices=ATTENTION)
    parser.add_argument("--loss", default="chunked", choices=("chunked", "full_logits"))
    parser.add_argument("--no-kbit-upcast", action="store_true", help="prepare_model_for_kbit_training is not called")
    parser.add_argument("--padded", action="store_true", help="batches carry padding (attention mask)")
    parser.add_argument("--padding-free", action="store_true",
                        help="padding-free batches: rows flattened into one sequence (TRL padding_free)")
    parser.add_argument("--packing", action="store_true",
                        help="bfd packing (TRL's default strategy): padding-free rows of --seq-len tokens")
    parser.add_argument("--liger", action="store_true", help="Liger kernels (RMSNorm, SwiGLU; fused loss with full_logits)")
    parser.add_argument("--gpu", default=None, help=f"also report the largest batch and length that fit: {', '.join(GPUS)}")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return parser


def settings_from_args(args: argparse.Namespace) -> MemorySettings:
    targets = args.targets if args.targets == "all-linear" else [t for t in args.targets.split(",") if t.strip()]
    return MemorySettings(
        method=args.method,
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2 * args.rank,
        targets=targets,
        dora=args.dora,
        lora_dropout=args.lora_dropout,
        batch_size=args.batch,
        seq_len=args.seq_len,
        gradient_checkpointing=not args.no_grad_ckpt,
        optimizer=args.optimizer,
        compute_dtype=args.dtype,
        double_quant=not args.no_double_quant,
        attn=args.attn,
        loss=args.loss,
        kbit_upcast=not args.no_kbit_upcast,
        padded=args.padded and not (args.padding_free or args.packing),
        padding_free=args.padding_free or args.packing,
        liger=args.liger,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
