"""The repository cites the two papers, and only sections they have.

The code and prose once cited a working spec kept outside the repository. Every such citation now
names a section of the papers themselves, or `docs/settings.md` (settings the papers leave unstated),
`docs/released-trainer.md` (departures of the authors' released trainer) or the notebook that decides
the matter. This test keeps it so: no tracked file names the old spec, and every citation of the form
"paper N §X" or "paper N App. X" names a section that paper has. The forms in use are all read:
"Paper 2, Appendix F", "P1 §3.1" (the README's table), and chains that continue the same paper, such
as "paper 1 §3.4 and §5", "paper 2 §3–§4.1", "paper 1 §4–5" or "P1 App. A, §3.3". The sections are
listed here rather than read from the papers, so that the repository stands alone.
"""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# built from pieces so that this file does not name them itself: the working spec, and the install notes
# kept beside it, neither of which is part of the repository
RETIRED_SPEC = "method" + ".md"
OUTSIDE_NOTES = ("toolchain" + ".md",)

# Paper 1, "Learning Dynamics of Meta-Learning in Small Model Pretraining": 1 Introduction, 2 Related
# Work, 3 Method (3.1 Baselines, 3.2 Task construction via SMLMT, 3.3 Optimiser, data, and monitoring,
# 3.4 Downstream protocol), 4 Model Pretraining, 5 Downstream NER Evaluation, 6 Learning Dynamics,
# 7 Conclusion; appendices A Pseudocode (A.1 Multi-GPU processing), B Universal NER Datasets,
# C Supplementary Figures (C.1 Supplementary Tables).
# Paper 2, "Meta-Pretraining for Zero-Shot Cross-Lingual NER in Low-Resource Philippine Languages":
# 1 Introduction (1.1 Contributions), 2 Method (2.1 Motivation, 2.2 Architecture, 2.3 Hybrid
# pretraining objective, 2.4 Optimisation and monitoring, 2.5 Finetuning on High-Resourced Languages,
# 2.6 Baselines), 3 Zero-Shot Transfer Results, 4 Analysis (4.1 Checkpoint, 4.2 Tag-level, 4.3
# Word-level), 5 Finetuning Speed, 6 Related Work, 7 Conclusion; appendices A typology, B case
# studies, C pseudocode (C.1 Multi-GPU processing), D Universal NER datasets (D.1 Slovak token
# statistics, D.2 particle and OOV statistics), E pretraining results, F default pico-maml-train
# configurations.
SECTIONS = {
    "1": {"1", "2", "3", "3.1", "3.2", "3.3", "3.4", "4", "5", "6", "7", "A", "A.1", "B", "C", "C.1"},
    "2": {"1", "1.1", "2", "2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "3", "4", "4.1", "4.2", "4.3", "5", "6", "7",
          "A", "B", "C", "C.1", "D", "D.1", "D.2", "E", "F"},
}

# one reference: "§3.3", "§ 3.3", "App. A.1", "Appendix F"
REF = r"(?:§\s?\d+(?:\.\d+)*|(?:App\.|Appendix)\s?[A-Z](?:\.\d+)?\b)"
# a further reference of the same paper: after ",", "/" or "and", or after a range dash, where the
# "§" may be left out ("§4–5")
NEXT = rf"(?:\s*(?:,|/|\band\b)\s*{REF}|\s*[–-]\s*(?:{REF}|\d+(?:\.\d+)*))"
CITATION = re.compile(rf"\b(?:[Pp]aper\s([12]),?|P([12]))\s({REF}(?:{NEXT})*)")
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)|(?:App\.|Appendix)\s?([A-Z](?:\.\d+)?)|[–-]\s*(\d+(?:\.\d+)*)")


def citations(text: str) -> list[tuple[int, str, str, str]]:
    "(line, paper, section, the citation as written) for every section `text` cites; appendices by letter."
    found = []
    for m in CITATION.finditer(text):
        line, paper = text.count("\n", 0, m.start()) + 1, m.group(1) or m.group(2)
        found += [(line, paper, "".join(s.groups(default="")), m.group(0)) for s in SECTION.finditer(m.group(3))]
    return found


@pytest.fixture(scope="module")
def tracked_texts() -> dict[str, str]:
    "{path: text} of every file git tracks that is present and text (binary files are skipped)."
    if not (ROOT / ".git").exists(): pytest.skip("not a git checkout: there are no tracked files to read")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    texts = {}
    for name in filter(None, listed.decode().split("\0")):
        path = ROOT / name
        if not path.is_file(): continue  # deleted in the working tree
        data = path.read_bytes()
        if b"\0" in data: continue
        try: texts[name] = data.decode("utf-8")
        except UnicodeDecodeError: continue
    return texts


def test_the_parser_reads_every_form_in_use():
    cases = {
        "paper 1 §3.3's micro-batch": [("1", "3.3")],
        "Paper 2, Appendix F, Table 6": [("2", "F")],
        "paper 1 §3 / Appendix A, Algorithm 1": [("1", "3"), ("1", "A")],
        "paper 1 §3.4 and §5, paper 2 §2.5 and App. D": [("1", "3.4"), ("1", "5"), ("2", "2.5"), ("2", "D")],
        "paper 2 §3–§4.1 and paper 1 §3:": [("2", "3"), ("2", "4.1"), ("1", "3")],
        "(paper 1 §4–5)": [("1", "4"), ("1", "5")],
        "| P1 App. A, §3.3 |": [("1", "A"), ("1", "3.3")],
        "P1 §3.4; P2 §2.5": [("1", "3.4"), ("2", "2.5")],
        "paper 1 App. A.1: every GPU": [("1", "A.1")],
        "paper 2 §2.2 and Table 6, paper 1\n# §6": [("2", "2.2")],
        "Paper 1, Figure 3; paper §6; PaLM (Chowdhery et al. 2022, App. B)": [],
    }
    for text, expected in cases.items():
        assert [(paper, section) for _, paper, section, _ in citations(text)] == expected, text


def test_no_tracked_file_names_the_retired_spec(tracked_texts):
    naming = sorted(name for name, text in tracked_texts.items() if RETIRED_SPEC in text)
    assert not naming, (f"{naming} cite {RETIRED_SPEC}, which is not part of the repository: "
                        "cite the papers' sections, "
                        "docs/settings.md, docs/released-trainer.md or the notebook that decides the matter")


def test_no_tracked_file_cites_notes_outside_the_repository(tracked_texts):
    naming = sorted(name for name, text in tracked_texts.items() for note in OUTSIDE_NOTES if note in text)
    assert not naming, (f"{naming} cite notes that are not part of the repository: "
                        "say what was measured or cite its source")


def test_every_cited_section_exists(tracked_texts):
    found = [(name, *c) for name, text in tracked_texts.items() for c in citations(text)]
    assert len(found) > 100, f"only {len(found)} citations found: has the way the repository cites changed?"
    wrong = [f"{name}:{line}: {written!r}: paper {paper} has no section {section}"
             for name, line, paper, section, written in found if section not in SECTIONS[paper]]
    assert not wrong, "citations of sections the papers do not have:\n" + "\n".join(wrong)
