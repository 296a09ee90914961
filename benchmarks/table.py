"""Turn a ``mmcl-edge bench cl`` JSON into the markdown table used on benchmarks/README.md.

    python benchmarks/table.py bench-cl.json
"""
import json
import sys


def main(path: str) -> None:
    d = json.load(open(path))
    print(f"{d['scenario']} ({d['setting']}), mean ± std over {d['seeds']} seeds, accuracy in %\n")
    print("| method | final avg acc | avg incremental acc | forgetting | learn s |")
    print("|---|---|---|---|---|")
    for name, e in d["methods"].items():
        pm = lambda k, s=100: f"{s * e[k]:.1f} ± {s * e[k + '_std']:.1f}"
        print(f"| {name} | {pm('final_average_accuracy')} | {pm('average_incremental_accuracy')} | "
              f"{pm('forgetting')} | {pm('learn_seconds', 1)} |")


if __name__ == "__main__":
    main(sys.argv[1])
