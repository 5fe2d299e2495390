"""What h says: decode the interest embedding of a few test events back to text (the /explain path).

  python benchmarks/explain_examples.py --artifact artifacts/quality/latest --n 5

For each of the first `n` warm test events: the query and the last history titles, the text greedily
decoded from h through the reconstruction prefix (what `/explain` returns), the top-5 retrieved items,
and the clicked target. Writes benchmarks/results/explain_examples.md (the README quotes it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from karma_ray.artifact.reader import load_artifact
    from karma_ray.eval.evaluate import SplitEvents
    from karma_ray.models.inference import embed_interests

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default=str(REPO / "artifacts" / "quality" / "latest"))
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "explain_examples.md"))
    args = p.parse_args(argv)

    art = load_artifact(args.artifact)
    split = SplitEvents.load(art.config.data_dir, "test", art.config.eval)
    queries = [q or "" for q in split.events["query"].to_pylist()[: args.n]]
    histories = [list(h) for h in split.histories[: args.n]]
    h = embed_interests(art.model, art.builder, queries, histories)  # (n, emb)
    _, top = art.index.search(np.ascontiguousarray(h, dtype=np.float32), 5)
    prefix = torch.tensor(art.builder.decode_prefix)
    with torch.inference_mode():
        decoded = art.model.decode_from_h(torch.from_numpy(np.asarray(h)), prefix, art.builder.eos_id, 24)
    lines = [f"# /explain on `{Path(args.artifact).resolve().name}` (first {args.n} warm test events)", ""]
    for i in range(args.n):
        shown = histories[i][-3:]
        lines += [f"**{i + 1}.** query `{queries[i] or '(none)'}`; last of {len(histories[i])} history items: "
                  + "; ".join(art.builder.title(int(x)) for x in shown), "",
                  f"- decoded from h: *{art.tokenizer.decode(decoded[i], skip_special_tokens=True).strip()}*",
                  "- top 5: " + "; ".join(art.builder.title(int(x)) for x in top[i]),
                  f"- clicked: {art.builder.title(int(split.targets[i]))}", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
