"""Why the regularisers cost retrieval on a truncated LM: the losses and gradient shares at step 0.

  python benchmarks/quality_depth.py                      # ml100k preset, layers 2,4,6,8,12,30

For each number of decoder layers kept, the pretrained SmolLM2 with fresh KARMA heads sees one fixed
batch of training rows (the preset's batch size, the preset's λ). It reports L_act, L_gen, L_recon
and, per loss, the norm of its weighted gradient on the backbone and that norm's share of the sum
of the three norms: a rough gauge of which loss steers the first update (AdamW rescales each
parameter, so it is not the share of the step). No training, no timing: every number is from one
forward/backward per loss. Writes benchmarks/results/quality_depth.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ml100k")
    p.add_argument("--layers", default="2,4,6,8,12,30", help="comma list of decoder layers kept")
    p.add_argument("--rows", type=int, default=0, help="batch rows (default: the preset's batch size)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def fixed_batch(cfg, rows: int) -> dict:
    """The first `rows` training rows (stored in seeded random order), through the Ray tokeniser's own callable."""
    import pyarrow.dataset as pads
    import torch

    from karma_ray.data.pipeline import TokenizeEvents
    from karma_ray.train.loop import trim_padding

    data_dir = Path(cfg.data.path).resolve()
    table = pads.dataset(str(data_dir / "train"), format="parquet").head(rows)
    arrays = TokenizeEvents(cfg.to_dict(), str(data_dir))(table)
    return trim_padding({k: torch.as_tensor(v) for k, v in arrays.items()})


def probe_depth(cfg, batch: dict) -> dict[str, Any]:
    """Losses and per-loss backbone gradient norms (weighted by λ, as they enter the update)."""
    import torch

    from karma_ray.models.karma import build_model

    torch.manual_seed(cfg.train.seed)
    model, _ = build_model(cfg.model, cfg.loss)
    out = model(batch)
    weights = {k: w for k, w in (("act", 1.0), ("gen", cfg.loss.lambda_gen), ("rec", cfg.loss.lambda_rec)) if w > 0}
    backbone = [p for p in model.lm.parameters() if p.requires_grad]
    norms = {}
    for name, w in weights.items():
        grads = torch.autograd.grad(w * out[name], backbone, retain_graph=True, allow_unused=True)
        norms[name] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    total = sum(norms.values())
    return {"losses": {k: round(float(out[k]), 4) for k in weights},
            "grad_norm": {k: round(v, 4) for k, v in norms.items()},
            "grad_share": {k: round(v / total, 4) for k, v in norms.items()}}


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from karma_ray.config import get_preset
    from karma_ray.train.run import ensure_data

    args = parse_args(argv)
    cfg = get_preset(args.preset).with_overrides(args.overrides)
    ensure_data(cfg)
    batch = fixed_batch(cfg, args.rows or cfg.train.batch_size)
    layers = [int(x) for x in args.layers.split(",")]
    rows = {}
    for n in tqdm(layers, desc="layers kept"):
        rows[n] = probe_depth(cfg.with_overrides([f"model.num_layers={n}"]), batch)
        tqdm.write(f"{n:>2} layers: {json.dumps(rows[n])}")
    result = {"preset": args.preset, "rows": int(batch["int_ids"].shape[0]), "lambda_gen": cfg.loss.lambda_gen,
              "lambda_rec": cfg.loss.lambda_rec, "layers": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_depth.json").write_text(json.dumps(result, indent=2))
    lines = ["# Losses and gradient shares at step 0, by decoder layers kept", "",
             f"Preset `{args.preset}`, one fixed batch of {result['rows']} training rows, λ_gen = {cfg.loss.lambda_gen}, "
             f"λ_rec = {cfg.loss.lambda_rec}. Gradient norms are over the backbone's parameters, each loss weighted by its λ.",
             "", "| layers | L_act | L_gen | L_recon | ‖∇L_act‖ | ‖λ∇L_gen‖ | ‖λ∇L_rec‖ | L_act share of the gradient |",
             "|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lo, g = r["losses"], r["grad_norm"]
        cells = [lo.get("act"), lo.get("gen"), lo.get("rec"), g.get("act"), g.get("gen"), g.get("rec")]
        lines.append(f"| {n} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells)
                     + f" | {r['grad_share']['act']:.1%} |")
    (out / "quality_depth.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
