"""README's Quick start and CI agree: .ci/run runs exactly README's test command."""

import re


def _quick_start_commands(readme: str) -> list[str]:
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_has_two_commands_and_ci_runs_the_test_one(repo_root):
    commands = _quick_start_commands((repo_root / "README.md").read_text())
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main_job, tests = commands
    assert "pytest" in tests and "pytest" not in main_job
    ci_lines = (repo_root / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines
