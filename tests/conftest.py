import os

import pytest

# No Hub access in tests: fail at once instead of retrying for ~23 s (read at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `make test` runs pytest on two workers (pytest-xdist, --dist loadgroup). Each test file is one group, so its
# module-scoped fixtures are built once; files that share a runs directory under the repository share a group and
# run on one worker in the order listed (the docs site is built from the smoke pipeline's runs, which it reuses).
SHARED_GROUPS = {"runs-smoke": ["test_pipeline_smoke", "test_docs"]}
# the longest groups start first, so neither worker is left with a long one at the end
LONGEST_FIRST = ["test_rehearsal", "runs-smoke", "test_released", "test_distributed", "test_user_errors",
                 "test_gpu_check", "test_cluster_faults", "test_reports_p2", "test_reports_p1"]


def group_of(item) -> str:
    module = item.path.stem
    return next((group for group, modules in SHARED_GROUPS.items() if module in modules), module)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    for item in items: item.add_marker(pytest.mark.xdist_group(group_of(item)))
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    within = lambda item: SHARED_GROUPS.get(group_of(item), [item.path.stem]).index(item.path.stem)
    # stable: file order within a file, and for the groups not listed
    items.sort(key=lambda item: (rank.get(group_of(item), len(rank)), within(item)))
