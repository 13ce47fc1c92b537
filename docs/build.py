"""Build the documentation site (`make docs`): execute the notebooks, then render them with Sphinx.

    python docs/build.py [--profile demo] [--execute PATTERN ...] [--out _docs] [--work _proc/docs] [--jobs 2]

1. Every notebook of nbs/ except the analysis notebooks runs as `nbdev_test` runs it (execnb, in nbs/,
   cells flagged with settings.ini's `tst_flags`, `#|slow` and `#|gpu`, are skipped), into the work
   folder: the committed nbs/*.ipynb stay output-free.
2. The analysis notebooks 21-24 run with papermill on a pipeline profile's runs (`demo` by default: the
   runs `make demo` leaves in runs/; `--profile smoke` uses runs/smoke), with the parameters the
   pipeline passes them, except that they write their figures and tables into the work folder (never
   into the committed figures/ and paper_tables/). A hidden first cell shows each figure and table a
   cell saves under that cell. Without the profile's runs the build stops and says to run `make demo`.
3. Sphinx (MyST-NB, furo theme, docs/conf.py) renders the executed notebooks, nbs/index as the home
   page, an API page per module from its docstrings, and the Markdown pages of docs/, into `--out`.

An executed notebook is reused while the notebook, the package and (for 21-24) the profile's run files
are unchanged; `--force` executes everything again.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import configparser
import fnmatch
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
DOCS = ROOT / "docs"
PACKAGE = ROOT / "picomaml"
KEY = "picomaml_docs_key"  # notebook metadata: what an executed copy was executed from
ANALYSIS = re.compile(r"2[1-9]_.*")  # the analysis notebooks (picomaml.pipeline.analysis_notebooks)

# The hidden first cell of an executed analysis notebook: each figure and table that `save_figure` /
# `save_table` writes is displayed under the cell that wrote it (the notebooks themselves only write files).
SHOW_OUTPUTS = '''\
import os as _docs_os
import picomaml.report as _docs_report
from IPython.display import Markdown as _DocsMarkdown, display as _docs_display

def _docs_shown(save, kind, prefix={prefix!r}):
    def shown(*args, **kwargs):
        paths = save(*args, **kwargs)
        name = _docs_os.path.splitext(_docs_os.path.basename(paths[0]))[0]
        if kind == "figure":
            _docs_display(_DocsMarkdown(f"![{{name}}]({{prefix}}/figures/{{name}}.png)"))
        else:
            _docs_display(_DocsMarkdown(open(paths[0], encoding="utf-8").read()))
        return paths
    return shown

_docs_report.save_figure = _docs_shown(_docs_report.save_figure, "figure")
_docs_report.save_table = _docs_shown(_docs_report.save_table, "table")
'''


class DocsError(Exception):
    "A problem the user can fix, reported in one line."


def settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"]


def digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def package_digest() -> str:
    return digest(*(p.read_bytes() for p in sorted(PACKAGE.glob("*.py"))))


def files_digest(paths) -> str:
    "Names, sizes and modification times of every file under `paths`."
    entries = []
    for top in paths:
        for dirpath, _, names in os.walk(top):
            for n in names:
                st = os.stat(os.path.join(dirpath, n))
                entries.append(f"{os.path.join(dirpath, n)} {st.st_size} {st.st_mtime_ns}")
    return digest(*sorted(entries))


def cached(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8"))["metadata"].get(KEY) == key
    except (ValueError, KeyError):
        return False


def set_key(path: Path, key: str) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    nb["metadata"][KEY] = key
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- executing (each in a worker process) ----------------------------------------------------------

def execute_module(src: str, dst: str, skip_flags: list, key: str) -> tuple[str, float, str | None]:
    "Execute a notebook as `nbdev_test` does (execnb, cwd nbs/, flagged cells skipped); write it to `dst`."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.process import extract_directives

    os.environ["IN_TEST"] = "1"  # as nbdev_test
    src, start = Path(src), time.perf_counter()
    nb = read_nb(src)
    for cell in nb.cells:
        cell.directives_ = extract_directives(cell, remove=True) if cell.cell_type == "code" else {}
    flags = set(skip_flags)

    def no_eval(cell):  # nbdev.test.test_nb's rule
        if cell.cell_type != "code": return True
        if "nbdev_export" + "(" in cell.source: return True
        if cell.directives_.get("eval:", [""])[0].lower() == "false": return True
        return flags & cell.directives_.keys()

    main = sys.modules["__main__"]  # IPython replaces it; this worker unpickles its next task from it
    shell = CaptureShell(src)
    error = None
    try:
        with working_directory(src.parent):
            shell.run_all(nb, exc_stop=True, preproc=no_eval)
    except Exception:
        error = shell.prettytb(fname=src)
    finally:
        sys.modules["__main__"] = main
        os.environ.pop("IN_TEST", None)
    if error:
        return src.name, time.perf_counter() - start, error
    # what the page shows: no directive-only cells (`#| default_exp`), no `#|hide` cells
    nb.cells = [c for c in nb.cells
                if not (c.cell_type == "code" and ("hide" in c.directives_ or not c.source.strip()))]
    nb.metadata[KEY] = key
    write_nb(nb, dst)
    return src.name, time.perf_counter() - start, None


def notebook_relative(params: dict) -> dict:
    "The parameters with every in-repository path made relative to nbs/, where the notebooks run (shown on the page)."
    def relative(value):
        if isinstance(value, list): return [relative(v) for v in value]
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(ROOT):
            return os.path.relpath(value, NBS)
        return value
    return {k: relative(v) for k, v in params.items()}


def execute_analysis(src: str, dst: str, params: dict, out_prefix: str, key: str) -> tuple[str, float, str | None]:
    "Execute an analysis notebook with papermill and `params`, a hidden first cell showing what it saves."
    import nbformat
    import papermill

    os.environ.pop("IN_TEST", None)  # set by execute_module in this worker: 21-24 would write to a temporary folder
    src, dst, start = Path(src), Path(dst), time.perf_counter()
    nb = nbformat.read(src, as_version=4)
    hook = nbformat.v4.new_code_cell(SHOW_OUTPUTS.format(prefix=out_prefix), metadata={"tags": ["remove-cell"]},
                                     id="docs-show-outputs")
    nb.cells.insert(0, hook)
    staged = dst.with_suffix(".in.ipynb")
    nbformat.write(nb, staged)
    declared = papermill.inspect_notebook(str(staged))
    try:
        papermill.execute_notebook(str(staged), str(dst), kernel_name="python3", cwd=str(NBS), progress_bar=False,
                                   parameters={k: v for k, v in params.items() if k in declared})
    except papermill.PapermillExecutionError as e:
        return (src.name, time.perf_counter() - start,
                f"cell {e.exec_count}: {e.ename}: {e.evalue} (executed copy: {dst})")
    finally:
        staged.unlink(missing_ok=True)
    set_key(dst, key)
    return src.name, time.perf_counter() - start, None


# ---- assembling the Sphinx sources -------------------------------------------------------------

def title_of(nb: dict, fallback: str) -> str:
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            m = re.match(r"\s*#\s+(.+)", "".join(cell["source"]))
            if m:
                return m.group(1).strip()
    return fallback


def insert_after_title(nb: dict, text: str) -> None:
    "Insert a markdown cell after the title cell (the first markdown cell)."
    i = next((i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown"), -1)
    nb["cells"].insert(i + 1, markdown_cell("docs-note", text))


def markdown_cell(cell_id: str, text: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": text}


def module_notebooks() -> dict:
    "module name -> notebook stem, from each notebook's `#| default_exp`."
    found = {}
    for nb in sorted(NBS.glob("*.ipynb")):
        m = re.search(r"#\s*\|\s*default_exp\s+([\w.]+)", nb.read_text(encoding="utf-8"))
        if m:
            found[m.group(1)] = nb.stem
    return found


def api_page(module: str, stem: str | None) -> str:
    source = f"The notebook [{stem}](../{stem}.ipynb) explains it with examples and tests.\n\n" if stem else ""
    return (f"# picomaml.{module}\n\nThe exported functions, classes and constants of `picomaml.{module}`, "
            f"from their docstrings. {source}"
            f"```{{eval-rst}}\n.. automodule:: picomaml.{module}\n```\n")


def toctree(caption: str, entries: list) -> str:
    return f"```{{toctree}}\n:hidden:\n:caption: {caption}\n\n" + "\n".join(entries) + "\n```\n"


def assemble(src: Path, executed: Path, outputs: Path, module_stems: list, analysis_stems: list,
             not_executed: list, profile_line: str) -> None:
    if src.exists():
        shutil.rmtree(src)
    (src / "api").mkdir(parents=True)
    for stem in module_stems + analysis_stems:
        path = executed / f"{stem}.ipynb" if stem not in not_executed else NBS / f"{stem}.ipynb"
        nb = json.loads(path.read_text(encoding="utf-8"))
        if stem in not_executed:
            insert_after_title(nb, "```{note}\nThis build did not execute this notebook (`docs/build.py --execute` "
                                   "left it out): it shows the code without its outputs. `make docs` executes it.\n```")
        elif stem in analysis_stems:
            insert_after_title(nb, f"```{{note}}\n{profile_line} The figures and tables under a cell are the files "
                                   "that cell wrote.\n```")
        if stem == "index":
            nb["cells"].append(markdown_cell("docs-toctree", site_toctrees(module_stems, analysis_stems)))
        (src / f"{stem}.ipynb").write_text(json.dumps(nb, ensure_ascii=False), encoding="utf-8")
    # the index shows the committed ones
    shutil.copytree(ROOT / "figures", src / "figures", ignore=shutil.ignore_patterns("*.pdf"))
    if outputs.exists():
        shutil.copytree(outputs, src / "_outputs")
    by_module = module_notebooks()
    for module in api_modules():
        (src / "api" / f"{module}.md").write_text(api_page(module, by_module.get(module)), encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        shutil.copy2(page, src / page.name)


def api_modules() -> list:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))


def site_toctrees(module_stems: list, analysis_stems: list) -> str:
    pages = [p.stem for p in sorted(DOCS.glob("*.md"))]
    trees = [toctree("Notebooks", [s for s in module_stems if s != "index"]),
             toctree("Analysis notebooks (the papers' tables and figures)", analysis_stems),
             toctree("API", [f"api/{m}" for m in api_modules()])]
    if pages:
        trees.append(toctree("Notes", pages))
    return "\n".join(trees)


# ---- the build -------------------------------------------------------------------------------

def profile_runs(profile_name: str):
    "The profile, its report parameters, and the run files the analysis notebooks read; DocsError if absent."
    from picomaml.names import ARMS, run_name
    from picomaml.pipeline import PROFILES, report_parameters

    profile = PROFILES[profile_name]
    params = report_parameters(profile)
    runs = Path(params["runs_dir"])
    run_dirs = [runs / run_name(size, arm, seed, profile.family)
                for size in profile.sizes for arm in ARMS for seed in profile.seeds]
    missing = [str(d.relative_to(ROOT)) for d in run_dirs if not (d / "metrics.jsonl").is_file()]
    ner = sorted((runs / "ner").glob("*-results.jsonl"))
    if not ner:
        missing.append(str((runs / "ner").relative_to(ROOT)) + "/*-results.jsonl")
    if missing:
        hint = ("run `make demo` first (or show the smoke runs: `python -m picomaml.pipeline smoke`, then "
                "`make docs DOCS_PROFILE=smoke`)" if profile_name == "demo"
                else f"run `python -m picomaml.pipeline {profile_name}` first")
        raise DocsError(f"the analysis notebooks 21-24 are executed on the {profile_name} runs, and "
                        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                        f"{'is' if len(missing) == 1 else 'are'} missing: {hint}")
    return profile, params, run_dirs + [runs / "ner"]


def build(profile_name="demo", execute=("*",), out=ROOT / "_docs", work=ROOT / "_proc" / "docs", jobs=2,
          force=False) -> Path:
    start = time.perf_counter()
    out, work = Path(out).resolve(), Path(work).resolve()
    profile, params, run_files = profile_runs(profile_name)
    skip_flags = settings().get("tst_flags", "").split()
    executed, outputs = work / "executed", work / "outputs"
    executed.mkdir(parents=True, exist_ok=True)

    notebooks = sorted(NBS.glob("*.ipynb"))
    analysis_stems = [p.stem for p in notebooks if ANALYSIS.fullmatch(p.stem)]
    module_stems = ["index"] + [p.stem for p in notebooks if p.stem != "index" and p.stem not in analysis_stems]
    to_execute = [s for s in module_stems if any(fnmatch.fnmatch(s, pat) for pat in execute)]
    not_executed = [s for s in module_stems if s not in to_execute]

    pkg = package_digest()
    runs_key = files_digest(run_files)
    jobs_todo, reused = [], []
    for stem in to_execute:
        src, dst = NBS / f"{stem}.ipynb", executed / f"{stem}.ipynb"
        key = digest(src.read_bytes(), pkg, skip_flags)
        if not force and cached(dst, key):
            reused.append(stem)
        else:
            jobs_todo.append((execute_module, str(src), str(dst), skip_flags, key))
    for stem in analysis_stems:
        src, dst = NBS / f"{stem}.ipynb", executed / f"{stem}.ipynb"
        nb_out = outputs / stem
        nb_params = notebook_relative({**params, "figures_dir": str(nb_out / "figures"),
                                       "tables_dir": str(nb_out / "tables")})
        key = digest(src.read_bytes(), pkg, SHOW_OUTPUTS, json.dumps(nb_params, sort_keys=True), runs_key)
        if not force and cached(dst, key) and nb_out.is_dir():
            reused.append(stem)
        else:
            shutil.rmtree(nb_out, ignore_errors=True)
            jobs_todo.append((execute_analysis, str(src), str(dst), nb_params, f"_outputs/{stem}", key))

    timings_file = work / "timings.json"  # seconds each notebook took last time: the longest start first
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    jobs_todo.sort(key=lambda job: -timings.get(Path(job[1]).stem, float("inf")))
    print(f"docs: executing {len(jobs_todo)} notebooks ({jobs} at a time; {len(reused)} unchanged, reused; "
          f"21-24 on the {profile_name} runs in {Path(params['runs_dir']).relative_to(ROOT)}/)", flush=True)
    failures = []
    if jobs_todo:
        # one fresh process per notebook: a notebook must not see the torch or matplotlib state another one left
        with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                         max_tasks_per_child=1) as pool:
            pending = [pool.submit(fn, *args) for fn, *args in jobs_todo]
            for done in futures.as_completed(pending):
                name, seconds, error = done.result()
                print(f"  {name}: {seconds:.0f} s{'  FAILED' if error else ''}", flush=True)
                timings[Path(name).stem] = round(seconds, 1)
                if error:
                    failures.append((name, error))
        timings_file.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")
    if failures:
        for name, error in failures:
            print(f"--- {name} ---\n{error}", file=sys.stderr)
        raise DocsError(f"{len(failures)} notebook(s) failed to execute: {', '.join(n for n, _ in failures)} "
                        "(tracebacks above)")

    profile_line = (f"Executed by `make docs` on the `{profile_name}` profile's runs "
                    f"(`{Path(params['runs_dir']).relative_to(ROOT)}/`, the NER results in its `ner/`)"
                    + (", with the pipeline's smoke settings (few steps, few bootstrap resamples)."
                       if profile.smoke else "."))
    src = work / "src"
    assemble(src, executed, outputs, module_stems, analysis_stems, not_executed, profile_line)

    if out.exists():
        shutil.rmtree(out)
    warnings = work / "sphinx-warnings.txt"
    sphinx_start = time.perf_counter()
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", "-j", str(jobs), "-c", str(DOCS),
           "-d", str(work / "doctrees"), "-w", str(warnings), str(src), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise DocsError(f"sphinx-build failed (exit {proc.returncode}); its warnings are in {warnings}")
    n_warn = sum(1 for line in warnings.read_text().splitlines() if "WARNING" in line) if warnings.exists() else 0
    pages = len(list(out.rglob("*.html")))
    print(f"docs: rendered {pages} pages into {os.path.relpath(out)}/ in {time.perf_counter() - sphinx_start:.0f} s "
          f"({n_warn} Sphinx warnings, listed in {os.path.relpath(warnings)}); "
          f"total {time.perf_counter() - start:.0f} s; "
          f"open {os.path.relpath(out)}/index.html", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python docs/build.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="demo", help="whose runs the analysis notebooks 21-24 show: demo (runs/, "
                   "`make demo`), smoke (runs/smoke), rehearse or paper (default: demo)")
    p.add_argument("--execute", nargs="+", default=["*"], metavar="PATTERN",
                   help="execute only the notebooks whose names match (default: all); 21-24 always run")
    p.add_argument("--out", default=str(ROOT / settings().get("doc_path", "_docs")), help="the site (default: _docs/)")
    p.add_argument("--work", default=str(ROOT / "_proc" / "docs"), help="executed notebooks and Sphinx sources")
    p.add_argument("--jobs", type=int, default=2, help="notebooks executed at once")
    p.add_argument("--force", action="store_true", help="execute every notebook again, even when unchanged")
    args = p.parse_args(argv)
    from picomaml.pipeline import PROFILES
    if args.profile not in PROFILES:
        p.error(f"--profile must be one of {', '.join(sorted(PROFILES))}")
    try:
        build(args.profile, args.execute, args.out, args.work, args.jobs, args.force)
    except DocsError as e:
        print(f"make docs: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
