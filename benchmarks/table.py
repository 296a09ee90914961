"""Turn a ``mmcl-edge bench cl`` JSON into the markdown table used on benchmarks/README.md.

    python benchmarks/table.py bench-cl.json
"""
import json
import sys


def main(path: str) -> None:
    d = json.load(open(path))
    # final average accuracy with each modality missing at test time, where the run measured it
    missing = next((list(e["missing_modality"]) for e in d["methods"].values() if e.get("missing_modality")), [])
    print(f"{d['scenario']} ({d['setting']}), mean ± std over {d['seeds']} seeds, accuracy in %\n")
    print("| method | final avg acc | avg incremental acc | forgetting | learn s |"
          + "".join(f" without {m} |" for m in missing))
    print("|---|---|---|---|---|" + "---|" * len(missing))
    for name, e in d["methods"].items():
        pm = lambda k, s=100: f"{s * e[k]:.1f} ± {s * e[k + '_std']:.1f}"
        gone = e.get("missing_modality") or {}
        print(f"| {name} | {pm('final_average_accuracy')} | {pm('average_incremental_accuracy')} | "
              f"{pm('forgetting')} | {pm('learn_seconds', 1)} |"
              + "".join(f" {100 * gone[m]:.1f} |" if m in gone else " – |" for m in missing))


if __name__ == "__main__":
    main(sys.argv[1])
