"""Memory of one replica's artifact state: lean loaders (what each Serve stage loads now) against the
full artifact (what the encoder replica loaded before), each measured in a fresh process.

  python benchmarks/serve_replica_memory.py                 # artifacts/latest
  python benchmarks/serve_replica_memory.py --artifact DIR

Resident memory (VmRSS) after the same imports in every probe and after the load, in MiB; the item
embeddings, FAISS index and item table scale with the catalogue (N × d × 4 bytes each for the first
two), the model does not. Writes
benchmarks/results/serve_replica_memory.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOADERS = {  # what a replica of each kind holds for one artifact version
    "encoder, before (full artifact)": "from karma_ray.artifact.reader import load_artifact as f",
    "encoder, now (model + prompt builder)": "from karma_ray.serve.encoder import load_encoder_state as f",
    "recall (index only)": "from karma_ray.serve.recall import load_recall_state as f",
    "pre-rank / rank (catalogue + item_emb mmap + rankers)": "from karma_ray.serve.ranking import load_ranker_state as f",
}
PROBE = """
import json, sys
import torch, faiss, ray.serve  # every probe imports the same modules first: the deltas compare loads
import karma_ray.artifact.reader, karma_ray.models.karma, karma_ray.serve.app
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
{imp}
before = rss()
state = f(sys.argv[1])
print(json.dumps({{"rss_after_imports_mib": round(before, 1), "rss_after_load_mib": round(rss(), 1)}}))
"""


def measure(artifact: str, imp: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(imp=imp), artifact], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m = json.loads(out.stdout.strip().splitlines()[-1])
    m["loaded_mib"] = round(m["rss_after_load_mib"] - m["rss_after_imports_mib"], 1)
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default=os.environ.get("KARMA_ARTIFACT", str(REPO / "artifacts" / "latest")))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    artifact = str(Path(args.artifact).resolve())
    result = {"artifact": artifact, "replicas": {name: measure(artifact, imp) for name, imp in LOADERS.items()},
              "loadavg": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_replica_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {n} | {m['rss_after_imports_mib']} | {m['rss_after_load_mib']} | {m['loaded_mib']} |"
                     for n, m in result["replicas"].items())
    (out / "serve_replica_memory.md").write_text(
        f"# Serve replica memory per artifact version\n\nArtifact `{Path(artifact).name}`; VmRSS in MiB of a fresh "
        f"process.\n\n| replica | after imports | after load | loaded |\n|---|---|---|---|\n{rows}\n")
    print(json.dumps(result["replicas"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
