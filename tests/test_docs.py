"""The README and docs/*.md as a newcomer pastes them: every fenced snippet composes or runs, every link resolves.

Rules, per fenced block of README.md and docs/*.md:
- bash: each command (backslash continuations joined, `# comments` dropped, `VAR=value` prefixes dropped) is checked
  without doing its work: `python run_ablation.py ARGS` (also `.venv/bin/python`, `torchrun ... run_ablation.py`,
  `srun ... python run_ablation.py`) composes with Hydra and resolves its job config (command-line sweeps: every
  value of each swept key, the others at their first value; a sweep file's own keys at their first value; `-m`,
  `--cfg job`, `--resolve` dropped); `python -m MODULE ARGS` gets through MODULE's argument parser; `make TARGET`
  names a Makefile target; anything else names an installed program.
- python: runs, in a fresh namespace and an empty temporary working folder.
- A block right after `<!-- not run: reason -->` is skipped (the reason is the test's skip message); one after
  `<!-- needs: FILE -->` runs with FILE made there first (convnext_tiny.pth: timm's convnext_tiny, random weights)
  and is marked slow.
- Every relative link and image, `#anchors` included, points at an existing file and heading.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = re.compile(r"<!--\s*(not run|needs):\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@dataclass
class Snippet:
    """One fenced block of a page: where it is, its language and text, and its marks."""

    page: Path
    line: int
    lang: str
    text: str
    not_run: str | None = None
    needs: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        """page:line, for test ids and messages."""
        page = self.page.relative_to(REPO) if self.page.is_relative_to(REPO) else self.page.name
        return f"{page}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    """Every fenced block of page, with the `<!-- not run / needs -->` mark on the line before it (blank lines
    between are allowed)."""
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2), i
        j = i + 1
        while j < len(lines) and not FENCE.match(lines[j]):
            j += 1
        body = "\n".join(line[indent:] for line in lines[i + 1 : j])
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = MARK.search(lines[k]) if k >= 0 else None
        snip = Snippet(page, start + 1, lang, body)
        if mark and mark.group(1) == "not run":
            snip.not_run = mark.group(2)
        elif mark:
            snip.needs = mark.group(2).split()
        out.append(snip)
        i = j + 1
    return out


ALL = [s for page in PAGES for s in snippets(page)]


def commands(text: str) -> list[list[str]]:
    """The shell commands of a bash block as argv lists."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):  # OMP_NUM_THREADS=1 python ...
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def _is_python(word: str) -> bool:
    """python, python3, .venv/bin/python."""
    return re.fullmatch(r"(.*/)?python3?", word) is not None


# Launchers that start run_ablation.py on a cluster: their own options are theirs to check (srun is not installed
# here), the run's arguments after run_ablation.py are checked like any other.
LAUNCHERS = ("torchrun", "srun")


def hydra_args(argv: list[str]) -> list[str] | None:
    """The arguments run_ablation.py gets, or None when argv does not run it."""
    if _is_python(argv[0]) and len(argv) > 1 and argv[1] == "run_ablation.py":
        return argv[2:]
    if argv[0] in LAUNCHERS and "run_ablation.py" in argv:
        return argv[argv.index("run_ablation.py") + 1 :]
    return None


def override_sets(args: list[str]) -> list[list[str]]:
    """Hydra override lists a command line stands for: its flags dropped, each sweep's every value in turn (the
    other sweeps at their first value)."""
    flags = {"-m", "--multirun", "--resolve"}
    overrides, it = [], iter(args)
    for a in it:
        if a in flags:
            continue
        if a in ("--cfg", "-c"):
            next(it)
            continue
        assert not a.startswith("-"), f"flag {a!r}: this test does not know what it does"
        overrides.append(a)
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        if not o.is_sweep_override():
            choices.append([o.input_line])
            continue
        if type(o.value()).__name__ == "Glob":  # glob(*) over a config group: its options, as Hydra expands it
            values = o.value().filter(sorted(p.stem for p in (CONF / o.key_or_group).glob("*.yaml")))
        else:
            values = list(o.sweep_string_iterator())
        choices.append([f"{o.get_key_element()}={v}" for v in values])
    first = [c[0] for c in choices]
    sets = [first]
    for i, c in enumerate(choices):
        sets += [first[:i] + [v] + first[i + 1 :] for v in c[1:]]
    return sets


def _sweep_defaults(overrides: list[str]) -> list[str]:
    """The first value of each sweep a `+sweep=NAME` file declares (hydra.sweeper.params, e.g. leave_one_out's
    step) that the command line does not override: the job a multirun starts with. Its other values are the sweep
    file's business (tests/test_sweep.py), not the page's."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    given = {o.key_or_group for o in parsed}
    out = []
    for o in parsed:
        if o.key_or_group == "sweep":
            params = OmegaConf.select(OmegaConf.load(CONF / "sweep" / f"{o.value()}.yaml"), "hydra.sweeper.params")
            for key, value in (params or {}).items():
                if key not in given:
                    (p,) = OverridesParser.create().parse_overrides([f"{key}={value}"])
                    out.append(
                        f"{key}={next(iter(p.sweep_string_iterator()))}" if p.is_sweep_override() else p.input_line
                    )
    return out


def check_hydra(args: list[str]) -> None:
    """Compose run_ablation.py's config for every override set of args and resolve its job part (the model node is
    filled by the roadmap resolver, so a bad step or toggle fails here), as run_ablation.py would before training."""
    from ablations.config import register, toggles

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for overrides in override_sets(args):
            overrides = overrides + _sweep_defaults(overrides)
            hydra = any(o.lstrip("+~").startswith("hydra") for o in overrides)  # then hydra.* is checked too
            cfg = compose("config", overrides=overrides, return_hydra_config=hydra)
            job = OmegaConf.create({k: cfg[k] for k in cfg if k != "hydra"})
            OmegaConf.to_container(job, resolve=True)
            toggles(job)


class _Parsed(Exception):
    """Raised instead of running a module once its arguments parsed."""


_PARSE_ARGS = argparse.ArgumentParser.parse_args  # the real one, whatever a test has patched


def check_module(module: str, args: list[str], monkeypatch) -> None:
    """`python -m module args` gets through the module's argparse parser (and does none of its work)."""

    def parse_only(self, argv=None, namespace=None):
        """Parse as the module would, then stop."""
        raise _Parsed(_PARSE_ARGS(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [f"python -m {module}", *args])
    with pytest.raises(_Parsed), warnings.catch_warnings():
        # runpy warns when the module was imported before (by another test): harmless here, nothing of it runs
        warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:  # argparse's exit on a bad argument: its message went to stderr
            raise AssertionError(f"python -m {module} {shlex.join(args)}: exit {e.code}") from None


def make_targets() -> set[str]:
    """The targets of the Makefile."""
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M))


def check_command(argv: list[str], monkeypatch) -> None:
    """One shell command of a page, checked by the module docstring's rules."""
    args = hydra_args(argv)
    if args is not None:
        check_hydra(args)
    elif _is_python(argv[0]) and len(argv) > 2 and argv[1] == "-m":
        check_module(argv[2], argv[3:], monkeypatch)
    elif argv[0] == "make":
        missing = set(argv[1:]) - make_targets()
        assert not missing, f"make: no target {', '.join(sorted(missing))} in the Makefile"
    else:
        assert shutil.which(argv[0]) or (Path(sys.executable).parent / argv[0]).exists(), f"{argv[0]}: not installed"


def make_needed(name: str, folder: Path) -> None:
    """A file a snippet names, made in its working folder."""
    if name == "convnext_tiny.pth":
        import timm
        import torch

        torch.save(timm.create_model("convnext_tiny").state_dict(), folder / name)  # timm's keys, random weights
    else:
        raise AssertionError(f"<!-- needs: {name} -->: this test does not know how to make {name}")


def run_python(snip: Snippet, folder: Path, monkeypatch) -> None:
    """Run a python snippet as pasted into a fresh interpreter, in folder."""
    monkeypatch.chdir(folder)
    for name in snip.needs:
        make_needed(name, folder)
    code = compile(snip.text, snip.where, "exec")
    exec(code, {"__name__": "__main__"})


def check_snippet(snip: Snippet, folder: Path, monkeypatch) -> None:
    """A snippet by its language: bash commands checked, python run; other languages (output, YAML) are text."""
    if snip.lang in ("bash", "sh", "shell", "console"):
        for argv in commands(snip.text):
            check_command(argv, monkeypatch)
    elif snip.lang == "python":
        run_python(snip, folder, monkeypatch)


def _param(snip: Snippet):
    """A pytest param for snip: skipped by its not-run mark, slow when it needs a file made."""
    marks = [pytest.mark.slow] if snip.needs else []
    if snip.not_run is not None:
        marks.append(pytest.mark.skip(reason=f"not run ({snip.where}): {snip.not_run}"))
    return pytest.param(snip, id=snip.where, marks=marks)


@pytest.mark.parametrize("snip", [_param(s) for s in ALL if s.lang in ("bash", "sh", "python")])
def test_snippet(snip, tmp_path, monkeypatch):
    """Every fenced bash or python block of the README and docs/*.md (rules: the module docstring)."""
    check_snippet(snip, tmp_path, monkeypatch)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The heading anchors of a Markdown page (outside fenced blocks)."""
    out, fenced = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#+\s+(.*)", line)):
            out.add(slug(m.group(1)))
    return out


def broken_links(page: Path) -> list[str]:
    """Relative links and images of page (outside fenced blocks) whose file or #anchor does not exist."""
    bad, fenced = [], False
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        for target in [] if fenced else LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                bad.append(f"{page.name}:{n}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                bad.append(f"{page.name}:{n}: {target} (no heading #{anchor} in {file.name})")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_links_resolve(page):
    """Every relative link and image of the README and docs/*.md points at an existing file (and heading)."""
    assert broken_links(page) == []


def test_readme_first_screen_holds_the_figure_and_the_commands():
    """The README starts with what the suite is, the roadmap figure, set-up, the three commands, then contents."""
    lines = (REPO / "README.md").read_text().splitlines()
    first = "\n".join(lines[:40])
    assert "![roadmap figure, CPU proxy](docs/roadmap.png)" in "\n".join(lines[:12])
    for command in ("make run", "make test", "run_ablation.py step=", "+sweep=roadmap", "-m analysis"):
        assert command in first, command
    assert "## Contents" in "\n".join(lines[:45])
    linked = set(re.findall(r"\(docs/(\w+\.md)", "\n".join(lines)))
    topics = {"configs.md", "runs.md", "sweeps.md", "clusters.md", "proxies.md", "data.md", "timm.md", "numbers.md"}
    assert topics <= linked and all((REPO / "docs" / t).is_file() for t in topics)


def test_checkers_catch_a_broken_link_snippet_and_command(tmp_path, monkeypatch):
    """The checkers fail on what they guard against: a missing file, a missing heading, a mistyped override, a
    wrong module flag, an unknown make target, a python snippet that raises; the marks are read."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n[ok](page.md#title) [gone](missing.md) [anchor](page.md#nothing) `[code](ignored.md)`\n\n"
        "<!-- not run: costs an hour -->\n```bash\nmake run\n```\n\n<!-- needs: convnext_tiny.pth -->\n"
        "```python\nraise RuntimeError('boom')\n```\n"
    )
    assert broken_links(page) == [
        "page.md:2: missing.md (no such file)",
        "page.md:2: page.md#nothing (no heading #nothing in page.md)",
    ]
    a, b = snippets(page)
    assert (a.lang, a.not_run, a.line, b.lang, b.needs) == ("bash", "costs an hour", 5, "python", ["convnext_tiny.pth"])
    with pytest.raises(RuntimeError, match="boom"):
        run_python(Snippet(page, 1, "python", "raise RuntimeError('boom')"), tmp_path, monkeypatch)
    bad = [
        ".venv/bin/python run_ablation.py step=gelu model.kernal_size=5",
        ".venv/bin/python run_ablation.py -m 'step=glob(*)' without=[gelux]",
        "python run_ablation.py roadmap.name=mine 'roadmap.steps=[baseline,gelu]' step=large_kernel",
        "python -m analysis runs --no-such-flag",
        "make no-such-target",
        "no-such-program --help",
    ]
    for line in bad:
        (argv,) = commands(line)
        with pytest.raises(Exception):  # noqa: B017  (Hydra, ConfigError and assertion errors alike)
            check_command(argv, monkeypatch)
    check_command(commands("OMP_NUM_THREADS=1 python run_ablation.py step=gelu \\\n  seed=1  # ok")[0], monkeypatch)
