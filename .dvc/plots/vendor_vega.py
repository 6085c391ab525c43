"""Inline Vega, Vega-Lite and vega-embed into page.html, DVC's template of the `dvc plots` page, so
the page draws its charts with no network (DVC's default page loads them from a CDN).

Each `<script data-package="name@version">` of page.html gets that npm package's built file, and
the comment before it the package's licence. To update: change a version there, then `make vega`
(needs `npm` and the npm registry)."""

import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

PAGE = Path(__file__).with_name("page.html")
SCRIPT = re.compile(
    r'<!-- (?P<package>[\w@.-]+), its licence:\n.*?-->\n(\s*)<script data-package="(?P=package)">.*?</script>', re.S
)


def built_files(package: str, folder: Path) -> tuple[str, str]:
    """(the minified browser build, the licence) of an npm package, from `npm pack`."""
    tarball = subprocess.run(["npm", "pack", "--silent", package], cwd=folder, capture_output=True, text=True, check=True)
    name = package.rsplit("@", 1)[0]
    with tarfile.open(folder / tarball.stdout.strip()) as tar:
        script = tar.extractfile(f"package/build/{name}.min.js").read().decode()
        licence = tar.extractfile("package/LICENSE").read().decode()
    script = re.sub(r"\n//# sourceMappingURL=\S+\s*$", "", script)  # no map to fetch
    assert "</script" not in script.lower() and "-->" not in licence, package
    return script, licence


def inline(match: re.Match, folder: Path) -> str:
    script, licence = built_files(match["package"], folder)
    indent = match[2]
    return (f'<!-- {match["package"]}, its licence:\n{licence.strip()}\n-->\n'
            f'{indent}<script data-package="{match["package"]}">{script}</script>')


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        page = SCRIPT.sub(lambda match: inline(match, Path(folder)), PAGE.read_text())
    PAGE.write_text(page)


if __name__ == "__main__":
    main()
