import os

# No Hub access in tests: fail at once instead of retrying for ~23 s (read at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `make test` runs pytest on two workers (pytest-xdist, --dist loadfile --no-loadscope-reorder: each file's tests on
# one worker, in order, its module-scoped fixtures built once). The files are handed out in this order: the first
# four go two to each worker at the start (the first and third to one, so the rehearsal, the longest, is followed
# by a short file), the rest to whichever worker is free; the docs site, which reuses the smoke pipeline's runs,
# comes last (commands.smoke_runs_lock keeps the two apart if they meet). Files not listed keep their order between.
HANDED_OUT_FIRST = ["test_rehearsal", "test_pipeline_smoke", "test_artifact", "test_released", "test_gpu_check",
                    "test_distributed", "test_user_errors", "test_cluster_faults", "test_reports_p2", "test_reports_p1"]
LAST = ["test_docs"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HANDED_OUT_FIRST)} | {name: 1000 + i for i, name in enumerate(LAST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(HANDED_OUT_FIRST)))  # stable: file order within
