"""Usage: python benchmarks/tools/reconstruct_arm_results.py WORK_DIR RUN_LOG ARM [ARM ...]

One-off: arm_result.json for arms finished by a quality.py process that was OOM-killed later (before the
arm_result.json files existed), from each arm's metrics.jsonl (final test row) and the run log's timings."""
import json, re, sys
from pathlib import Path
work, log_path = Path(sys.argv[1]), Path(sys.argv[2])
log = log_path.read_text(errors="replace")
kb = None
for arm in sys.argv[3:]:
    rows = [json.loads(x) for x in (work / arm / "metrics.jsonl").read_text().splitlines() if x.strip()]
    final = rows[-1]
    assert final["split"] == "test", (arm, final)
    wall = float(re.search(rf"=== arm {re.escape(arm)} done in (\d+)s", log).group(1))
    block = log[log.index(f"=== arm {arm} ("):log.index(f"=== arm {arm} done")]
    refresh = sum(float(x) for x in re.findall(r"index v\d+ built at step [1-9]\d* \(\d+ passages\) in ([\d.]+)s", block))
    splits = json.loads(re.search(r"QA examples: (\{[^}]*\})", log).group(1).replace("'", '"'))
    n_kb = int(re.search(r"published v000001 \(step 0, (\d+) vectors\)", log).group(1))
    res = {"split": "test", "n": final["n"], "n_generated": final.get("n_generated"),
           **{k: final.get(k) for k in ("em", "f1", "recall@1", "recall@5", "recall@20", "mrr", "bleu")},
           "rouge_l": final.get("rougeL"), "loss_last": final.get("loss"), "steps": final["step"],
           "index_version": final.get("index_version"), "train_seconds": None, "refresh_seconds": round(refresh, 1),
           "refresh_share_of_train": None, "kb_passages": n_kb, "splits": splits, "arm_wall_seconds": wall,
           "reconstructed": f"from {arm}/metrics.jsonl and the run log after the process was OOM-killed later"}
    (work / arm / "arm_result.json").write_text(json.dumps(res, indent=2))
    print(arm, res["recall@5"], res["em"], res["f1"], wall)
