"""What the docs promise a new user holds: every document they point to exists (links, their
sections, `docs/*.md` mentioned in code), nothing cites a document outside the repository,
module names in the docs are the ones the code uses, experiments that submit to SLURM say so,
and the licence, the citation and the README agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from distillation.task import student_module
from pixio.models.registry import list_models

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pixio", "pretraining", "evaluation", "distillation", "configs", "scripts", "docs", "tests")  # fmt: skip
TEXT = (".py", ".md", ".yaml", ".sh", ".sbatch", ".cff")
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def text_files() -> list[Path]:
    """The repository's source, config, script and doc files (no .venv, outputs or data)."""
    found = [REPO / "README.md", REPO / "CITATION.cff", REPO / "Makefile"]
    for folder in SOURCES:
        found += [p for p in (REPO / folder).rglob("*") if p.suffix in TEXT and p.is_file()]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#{1,6} (.*)$", path.read_text(), flags=re.M)}


def test_nothing_cites_a_document_the_repository_lacks():
    private = "SP" + "EC"  # the project's private reference: its facts live in docs/reproduction.md
    cites = [f"{p.relative_to(REPO)}:{n}" for p in text_files() for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(rf"\b{private}\b", line)]  # fmt: skip
    assert cites == []
    mentioned = {m for p in text_files() for m in re.findall(r"\bdocs/[\w-]+\.md", p.read_text())}
    assert [m for m in sorted(mentioned) if not (REPO / m).is_file()] == []


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: p.name)
def test_every_relative_link_and_section_exists(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # code is not links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"(https?|mailto):", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


def test_student_module_names_in_the_docs_are_the_code_s():
    """`student_<encoder name>` (distillation.task.student_module), e.g. student_pixio_vith16."""
    real = {student_module(name) for name in list_models()}
    places = [*MARKDOWN, *REPO.glob("scripts/*.sh"), REPO / "pixio" / "convert.py"]
    named = {m for p in places for m in re.findall(r"\bstudent_(?:pixio_)?vit\w*", p.read_text())}  # fmt: skip
    assert named and named <= real, sorted(named - real)


def test_convert_help_names_a_real_module(capsys):
    from pixio import convert

    with pytest.raises(SystemExit):
        convert.main(["--help"])
    helped = set(re.findall(r"student_\w+", capsys.readouterr().out))
    assert helped and helped <= {student_module(name) for name in list_models()}


def experiments_selecting_slurm() -> dict[str, bool]:
    """Experiment name -> whether it selects launcher=slurm (defaults override or launcher.name)."""
    chosen = {}
    for path in sorted((REPO / "configs" / "experiment").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        overrides = [d for d in cfg.get("defaults", []) if isinstance(d, dict)]
        by_default = any(d.get("override /launcher") == "slurm" for d in overrides)
        chosen[path.stem] = by_default or (cfg.get("launcher") or {}).get("name") == "slurm"
    return chosen


def test_experiments_that_submit_to_slurm_say_so_first_and_in_the_readme():
    chosen = experiments_selecting_slurm()
    assert sum(chosen.values()) == 6  # the two pre-training and four distillation recipes
    for name, slurm in chosen.items():
        lines = (REPO / "configs" / "experiment" / f"{name}.yaml").read_text().splitlines()
        first = next(line for line in lines if line.startswith("#") and "@package" not in line)
        assert first.startswith("# Submitted to SLURM (launcher=slurm)") == slurm, name
        assert slurm or "SLURM" not in first, name
    readme = (REPO / "README.md").read_text()
    paragraph = readme.split("Experiments that submit to SLURM", 1)[1].split("\n\n", 1)[0]
    listed = {n for n in re.findall(r"`(\w+)`", paragraph) if n in chosen}
    assert listed == {name for name, slurm in chosen.items() if slurm}


def test_licence_citation_and_readme_agree():
    assert (REPO / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
    paper = cff["preferred-citation"]
    assert paper["title"] == "In Pursuit of Pixel Supervision for Visual Pre-training"
    assert [a["family-names"] for a in paper["authors"]] == ["Yang", "Li", "Li", "Lei", "Wang", "Mohamed", "Zhao", "Xu"]  # fmt: skip
    readme = (REPO / "README.md").read_text()
    assert paper["url"] == "https://arxiv.org/abs/2512.15715" and f"({paper['url']})" in readme
    assert "Apache License 2.0" in readme and "https://huggingface.co/facebook/pixio-vith16" in readme  # fmt: skip
