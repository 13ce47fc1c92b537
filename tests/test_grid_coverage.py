"""Issue 11: the NER grids of every profile cover every cell the report notebooks read (picomaml.report.NER_READS)."""
import dataclasses

import yaml

from picomaml.config import PRESETS_DIR
from picomaml.ner_sweep import load_grid, uncovered
from picomaml.pipeline import PROFILES
from picomaml.report import NER_READS


def profile_jobs(profile, runs_dir):
    return [j for g in profile.grids
            for j in load_grid(PRESETS_DIR / "sweeps" / f"{g}.yaml", runs_dir, profile.seeds, profile.grid_overrides)]


def test_paper_and_rehearsal_grids_cover_every_report_read(tmp_path):
    for name in ("paper", "rehearse"):
        profile = dataclasses.replace(PROFILES[name], seeds=[42, 1, 2])
        gaps = uncovered(profile_jobs(profile, tmp_path), NER_READS, profile.sizes, profile.seeds, profile.family,
                         profile.sweep_size)
        assert gaps == [], f"{name}: {len(gaps)} cells no grid produces, e.g. {gaps[:3]}"


def test_a_grid_without_the_vanilla_sweep_run_is_caught(tmp_path):
    spec = yaml.safe_load((PRESETS_DIR / "sweeps" / "paper2.yaml").read_text())
    spec["grids"][1]["runs"] = [r for r in spec["grids"][1]["runs"] if r["arm"] == "maml"]  # drop Fig. 9's vanilla run
    (tmp_path / "paper2.yaml").write_text(yaml.safe_dump(spec))
    profile = PROFILES["paper"]
    jobs = profile_jobs(dataclasses.replace(profile, grids=["paper1"]), tmp_path) + load_grid(tmp_path / "paper2.yaml",
                                                                                              tmp_path)
    gaps = uncovered(jobs, NER_READS, profile.sizes, profile.seeds, profile.family, profile.sweep_size)
    assert gaps == ["23_paper2_ner: pico-medium-vanilla crf head sk_snk final"]
