"""Check the course the way a learner meets it: in a real JupyterLab, in a real browser.

    python -m course_tools.workshop_check                      # every lesson listed in LESSONS
    python -m course_tools.workshop_check notebooks/00_welcome.ipynb

The check starts JupyterLab on 127.0.0.1 with a random token, from this Python environment, and
drives headless Chromium with Playwright. For each lesson it runs every cell from the Run menu,
asserts that no cell shows an error, moves each listed widget control and asserts that its figure
is redrawn, and saves screenshots to ``artifacts/browser/``. The repository's notebooks are never
touched: they are copied, without their outputs, into a temporary folder that JupyterLab serves.
Everything the check starts (server, kernels, browser) is stopped when it ends, even on failure.

``tests/test_browser.py`` runs the same flow under pytest; docs/workshop-check.md is the
instructor's guide. Chromium is found as ``$COURSE_CHROMIUM``, then ``chromium`` (Debian's
package) or ``chromium-browser`` on the PATH, then a browser installed by ``playwright install``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts" / "browser"


@dataclass(frozen=True)
class LessonCheck:
    """One notebook to run in the browser, and the widget controls that must drive a figure."""

    notebook: str                   # path relative to the repository root
    controls: tuple[str, ...] = ()  # descriptions (labels) of controls; each is moved once and the
                                    # first figure after it in the same cell must be redrawn


# Lessons checked in the browser: lesson 0 and the lessons whose widgets matter most. Adding a
# lesson is one line; a listed notebook that does not exist (yet) is left out by `available_lessons`.
LESSONS = (
    LessonCheck("notebooks/00_welcome.ipynb", controls=("t",)),
    LessonCheck("notebooks/08_sd_lineage.ipynb", controls=("Euler steps",)),
    LessonCheck("notebooks/09_editing.ipynb", controls=("strength",)),
    LessonCheck("notebooks/10_personalize.ipynb", controls=("LoRA scale",)),
    LessonCheck("notebooks/11_flow_matching.ipynb", controls=("NFE",)),
)

# Chromium flags for a closed network and a container: no first-run UI, nothing phoned home, no sandbox
# (root in CI), no GPU. Playwright gives each launch a fresh, temporary profile (user data dir).
CHROMIUM_ARGS = (
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-sync",
)

# JupyterLab settings that keep the page quiet and deterministic: no news or update check (each would be a
# request to the internet and a pop-up), and every cell attached to the page so that all outputs can be read.
LAB_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {"checkForUpdates": False, "fetchNews": "false"},
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
}

STDERR_MIME = "application/vnd.jupyter.stderr"
_EXCEPTION_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", re.MULTILINE)


def available_lessons(lessons: tuple[LessonCheck, ...] | None = None) -> list[LessonCheck]:
    """The lessons of ``lessons`` (default: LESSONS) whose notebook exists in this checkout."""
    return [lesson for lesson in (LESSONS if lessons is None else lessons) if (ROOT / lesson.notebook).is_file()]


def find_chromium() -> str | None:
    """Path of a Chromium to drive, or None. Playwright's own download is the last resort (offline it is absent)."""
    explicit = os.environ.get("COURSE_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    for app in ("/Applications/Chromium.app/Contents/MacOS/Chromium",
                "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"):
        if Path(app).exists():
            return app
    try:
        from playwright.sync_api import sync_playwright
        with sync_playwright() as p:
            bundled = p.chromium.executable_path
        return bundled if Path(bundled).exists() else None
    except Exception:
        return None


def playwright_missing_reason() -> str | None:
    """None when Playwright's Python package imports, else a sentence saying how to get it."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"the Python package 'playwright' is not installed ({e}); it is in the course's dev extra: pip install -e '.[dev]'"
    return None


def is_error_text(text: str) -> bool:
    """Does an stderr output show an exception (not just a warning)? Warnings are allowed; tracebacks are not."""
    return "Traceback" in text or bool(_EXCEPTION_LINE.search(text))


# --------------------------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip_outputs(src: Path, dst: Path) -> None:
    """Copy a notebook without outputs, execution counts or saved widget state, so that whatever the
    browser shows afterwards was produced by this run."""
    nb = json.loads(src.read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    nb.get("metadata", {}).pop("widgets", None)
    dst.write_text(json.dumps(nb, indent=1), encoding="utf-8")


class LabServer:
    """JupyterLab on 127.0.0.1 with a random token, serving a temporary copy of the course.

    Use as a context manager; ``stop()`` is safe to call more than once and stops the server,
    its kernels and anything else in its process group.
    """

    def __init__(self, notebooks: list[str], startup_timeout: float = 90.0):
        self.tmp = Path(tempfile.mkdtemp(prefix="course-browser-"))
        self.root = self.tmp / "course"
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.log_path = self.tmp / "jupyterlab.log"
        self.startup_timeout = startup_timeout
        self.notebooks = notebooks
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare_root(self) -> None:
        # The lessons' folder is copied (other files in it too, e.g. pictures); notebooks lose their outputs.
        # Folders that a lesson may read relative to itself are linked, read-only in spirit.
        for rel in self.notebooks:
            src = ROOT / rel
            dst = self.root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            for extra in src.parent.iterdir():
                if extra.is_file() and extra.suffix != ".ipynb" and not (dst.parent / extra.name).exists():
                    shutil.copy2(extra, dst.parent / extra.name)
            _strip_outputs(src, dst)
        for name in ("assets", "weights"):
            if (ROOT / name).is_dir() and not (self.root / name).exists():
                (self.root / name).symlink_to(ROOT / name, target_is_directory=True)
        settings = self.tmp / "app-settings"
        settings.mkdir()
        (settings / "overrides.json").write_text(json.dumps(LAB_OVERRIDES, indent=2))

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST_", "JUPYTER_", "JPY_")) and k not in ("MPLBACKEND", "IPYTHONDIR")}
        # Only the course's environment: no user-level Jupyter config, extensions or IPython start-up files.
        env.update(
            COURSE_PROGRESS="0",
            JUPYTER_CONFIG_DIR=str(self.tmp / "jupyter-config"),
            JUPYTER_DATA_DIR=str(self.tmp / "jupyter-data"),
            JUPYTER_RUNTIME_DIR=str(self.tmp / "jupyter-runtime"),
            JUPYTER_PLATFORM_DIRS="1",
            IPYTHONDIR=str(self.tmp / "ipython"),
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self) -> "LabServer":
        self._prepare_root()
        cmd = [
            sys.executable, "-m", "jupyter", "lab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
            "--ServerApp.open_browser=False", "--ServerApp.terminals_enabled=False",
            # If this process is killed before it can clean up, the server still ends on its own.
            "--ServerApp.shutdown_no_activity_timeout=600",
            "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            f"--LabApp.app_settings_dir={self.tmp / 'app-settings'}",
            f"--LabApp.user_settings_dir={self.tmp / 'user-settings'}",
            f"--LabApp.workspaces_dir={self.tmp / 'workspaces'}",
            "--LabApp.extension_manager=readonly",  # no queries to PyPI for the extension manager
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # CI containers run as root
        self._log = open(self.log_path, "wb")
        # Its own process group (session), so that stop() can end it and every child it started.
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=self._env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)

    def api(self, method: str, path: str):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Shut down every kernel of this server (between lessons, to keep memory free)."""
        try:
            for kernel in self.api("GET", "/api/kernels"):
                self.api("DELETE", f"/api/kernels/{kernel['id']}")
        except OSError:
            pass

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        # Kernels run in sessions of their own: remember every descendant before the server goes.
        try:
            import psutil
            children = psutil.Process(proc.pid).children(recursive=True)
        except Exception:
            children = []
        if proc.poll() is None:
            try:  # a clean shutdown first: the server stops its kernels itself
                self.api("POST", "/api/shutdown")
                proc.wait(timeout=10)
            except Exception:
                pass
        if hasattr(os, "killpg"):  # the whole process group, also what the server left behind
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break  # the group is empty
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        elif proc.poll() is None:  # Windows: no process groups
            proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for child in children:
            try:
                child.kill()
            except Exception:
                pass
        if self._log:
            self._log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "LabServer":
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc) -> None:
        self.cleanup()


# -------------------------------------------------------------------------------------------- browser


class Browser:
    """Headless Chromium driven by Playwright; a context manager that always closes it."""

    def __init__(self, executable: str | None):
        self.executable = executable
        self._pw = None
        self.browser = None

    def __enter__(self) -> "Browser":
        from playwright.sync_api import sync_playwright
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=self.executable, headless=True,
                                                    args=list(CHROMIUM_ARGS), timeout=60_000)
        except Exception:
            self._pw.stop()
            raise
        return self

    def new_page(self):
        context = self.browser.new_context(viewport={"width": 1400, "height": 900})
        return context.new_page()

    def __exit__(self, *exc) -> None:
        try:
            if self.browser is not None:
                self.browser.close()
        finally:
            self._pw.stop()


# ------------------------------------------------------------------------------------------ one lesson


@dataclass
class ControlResult:
    description: str
    kind: str = ""
    value_before: str = ""
    value_after: str = ""
    figure_changed: bool = False
    screenshots: list[str] = field(default_factory=list)
    problem: str = ""


@dataclass
class LessonReport:
    notebook: str
    seconds: float = 0.0
    code_cells: int = 0
    cells_run: int = 0
    not_run: list[int] = field(default_factory=list)     # indices (0-based, among all cells) never executed
    errors: list[str] = field(default_factory=list)      # exceptions shown in the page or saved in the notebook
    warnings: list[str] = field(default_factory=list)    # stderr outputs that are not exceptions (allowed)
    controls: list[ControlResult] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    screenshots: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)    # anything that makes the check fail

    @property
    def ok(self) -> bool:
        return not (self.problems or self.errors or self.not_run) and all(
            c.figure_changed and not c.problem for c in self.controls)

    def summary(self) -> str:
        lines = [f"{'PASS' if self.ok else 'FAIL'}  {self.notebook}  ({self.seconds:.1f} s)",
                 f"  cells run: {self.cells_run}/{self.code_cells} code cells"]
        if self.not_run:
            lines.append(f"  cells that did not run (cell numbers, from 1): {[i + 1 for i in self.not_run]}")
        for e in self.errors:
            lines.append("  ERROR: " + _clip(e, 600).replace("\n", "\n         "))
        for w in self.warnings:
            lines.append("  warning (allowed): " + _clip(w, 300).replace("\n", "\n    "))
        for c in self.controls:
            state = "figure redrawn" if c.figure_changed else "figure NOT redrawn"
            lines.append(f"  widget {c.description!r} ({c.kind}): {c.value_before} -> {c.value_after}: {state}"
                         + (f"; {c.problem}" if c.problem else ""))
        for p in self.problems:
            lines.append("  PROBLEM: " + p)
        for m in self.console_errors:
            lines.append("  browser console: " + _clip(m, 300))
        for u in self.external_requests:
            lines.append("  request that left the machine (blocked): " + u)
        for s in self.screenshots + [s for c in self.controls for s in c.screenshots]:
            lines.append(f"  screenshot: {s}")
        return "\n".join(lines)


def _clip(text: str, n: int) -> str:
    text = text.strip()
    return text if len(text) <= n else text[:n] + " ..."


def _slug(notebook: str) -> str:
    return Path(notebook).stem


# JavaScript run in the page. Prompts read "[ ]:" before a cell runs, "[*]:" while it waits or runs, "[7]:" after.
_JS_STATE = """() => {
  const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell')];
  const prompts = cells.map(c => c.classList.contains('jp-CodeCell')
      ? (c.querySelector('.jp-InputArea-prompt')?.textContent || '').trim() : null);
  const ind = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
  return {prompts, status: ind ? ind.getAttribute('data-status') : null};
}"""

# Every stderr output (warnings, and error outputs, which JupyterLab renders with the same mime type) and its cell.
_JS_STDERR = """() => {
  const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell')];
  return cells.flatMap((c, i) => [...c.querySelectorAll('.jp-OutputArea-output[data-mime-type="%s"]')]
      .map(e => ({cell: i, text: e.innerText})));
}""" % STDERR_MIME

# The first image after the control, in the same cell's output area (a play() figure or an Output widget's).
_JS_FIGURE_SRC = """(control) => {
  const area = control.closest('.jp-Cell')?.querySelector('.jp-Cell-outputArea');
  if (!area) return null;
  const img = [...area.querySelectorAll('img')].find(
      i => control.compareDocumentPosition(i) & Node.DOCUMENT_POSITION_FOLLOWING);
  return img ? img.getAttribute('src') : null;
}"""


class _Budget:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def ms(self, cap_s: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the browser check ran out of its time budget")
        return 1000 * min(cap_s, left)


def _menu(page, menu: str, item: str, budget: _Budget) -> None:
    """Click a main-menu entry, e.g. Run > Run All Cells, as a learner would."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{re.escape(menu)}$")).click(timeout=budget.ms(20))
    page.locator(".lm-Menu-content .lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).first.click(
        timeout=budget.ms(20))


def _shot(page_or_locator, path: Path, report_list: list, budget: _Budget) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    page_or_locator.screenshot(path=str(path), timeout=budget.ms(30))
    report_list.append(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))


def _move_control(page, control, result: ControlResult, budget: _Budget) -> None:
    """Change a control by one step through the UI: keyboard for sliders, the next option for choices."""
    classes = control.get_attribute("class") or ""
    if "widget-slider" in classes:
        result.kind = "slider"
        handle = control.locator(".noUi-handle").first
        result.value_before = control.locator(".widget-readout").inner_text().strip()
        handle.focus(timeout=budget.ms(10))
        page.keyboard.press("ArrowRight")
    elif "widget-dropdown" in classes:
        result.kind = "dropdown"
        select = control.locator("select")
        result.value_before = select.input_value()
        options = select.locator("option").all_inner_texts()
        current = select.evaluate("s => s.selectedIndex")
        select.select_option(index=(current + 1) % len(options), timeout=budget.ms(10))
    elif "widget-toggle-buttons" in classes:
        result.kind = "toggle buttons"
        result.value_before = control.locator("button.mod-active").inner_text().strip()
        control.locator("button:not(.mod-active)").first.click(timeout=budget.ms(10))
    elif "widget-checkbox" in classes:
        result.kind = "checkbox"
        box = control.locator("input[type=checkbox]")
        result.value_before = str(box.is_checked())
        box.click(timeout=budget.ms(10))
    else:
        raise ValueError(f"don't know how to move a widget with classes {classes!r}")


def _control_value(control, kind: str) -> str:
    if kind == "slider":
        return control.locator(".widget-readout").inner_text().strip()
    if kind == "dropdown":
        return control.locator("select").input_value()
    if kind == "toggle buttons":
        return control.locator("button.mod-active").inner_text().strip()
    return str(control.locator("input[type=checkbox]").is_checked())


def check_lesson(server: LabServer, browser: Browser, lesson: LessonCheck, deadline: float,
                 artifacts: Path = ARTIFACTS) -> LessonReport:
    """Open ``lesson`` in JupyterLab, run all cells, check outputs and widgets; never raises for a failed check."""
    report = LessonReport(lesson.notebook)
    budget = _Budget(deadline)
    slug = _slug(lesson.notebook)
    out = artifacts / slug
    shutil.rmtree(out, ignore_errors=True)
    start = time.monotonic()
    page = browser.new_page()
    page.on("console", lambda m: m.type == "error" and report.console_errors.append(m.text))
    page.on("pageerror", lambda e: report.console_errors.append(f"uncaught: {e}"))

    def block_external(route):  # the course runs offline: nothing may leave the machine
        report.external_requests.append(route.request.url)
        route.abort()
    page.route(re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)[:/]|data:|blob:).*"), block_external)
    try:
        # A workspace per lesson, reset, so that no other document is restored into the page.
        page.goto(f"{server.url}/lab/workspaces/{slug}/tree/{lesson.notebook}?reset&token={server.token}",
                  timeout=budget.ms(60))
        page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=budget.ms(60))
        _wait_for_kernel(page, server, lesson.notebook, report, budget)
        report.code_cells = sum(p is not None for p in page.evaluate(_JS_STATE)["prompts"])

        _menu(page, "Run", "Run All Cells", budget)
        # Running has begun once some prompt changed from "[ ]:"; it has ended when no prompt is "[*]:"
        # and the kernel is idle.
        page.wait_for_function(
            f"() => ({_JS_STATE})().prompts.some(p => p !== null && p !== '[ ]:')", timeout=budget.ms(30))
        try:
            page.wait_for_function(
                f"() => {{ const s = ({_JS_STATE})(); return s.status === 'idle' && !s.prompts.includes('[*]:'); }}",
                polling=250, timeout=budget.ms(240))
        except Exception as e:
            busy = [i + 1 for i, p in enumerate(page.evaluate(_JS_STATE)["prompts"]) if p == "[*]:"]
            raise TimeoutError(f"cells {busy} were still running or queued after {time.monotonic() - start:.0f} s "
                               f"({type(e).__name__})") from None
        page.wait_for_timeout(500)  # let the last outputs (images, widget views) render

        prompts = page.evaluate(_JS_STATE)["prompts"]
        report.cells_run = sum(bool(p and re.fullmatch(r"\[\d+\]:", p)) for p in prompts)
        sources = _cell_sources(server.root / lesson.notebook)
        report.not_run = [i for i, p in enumerate(prompts)
                          if p is not None and not re.fullmatch(r"\[\d+\]:", p) and sources[i].strip()]
        error_cells = set()
        for out_ in page.evaluate(_JS_STDERR):
            if is_error_text(out_["text"]):
                error_cells.add(out_["cell"])
                report.errors.append(f"cell {out_['cell'] + 1}: {out_['text'].strip()}")
            else:
                report.warnings.append(f"cell {out_['cell'] + 1}: {out_['text'].strip()}")
        if page.get_by_text("Error displaying widget").count():
            report.problems.append("a widget shows 'Error displaying widget' (the widget extension did not load)")
        _shot(page, out / "1-run-all-end.png", report.screenshots, budget)  # where Run All leaves the learner
        page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.scroll_into_view_if_needed(timeout=budget.ms(10))
        _shot(page, out / "1-run-all-top.png", report.screenshots, budget)

        for description in lesson.controls:
            result = ControlResult(description)
            report.controls.append(result)
            label = page.locator(".widget-label", has_text=re.compile(f"^{re.escape(description)}$"))
            control = page.locator(".jp-Cell-outputArea .jupyter-widgets.widget-inline-hbox", has=label).first
            try:
                control.wait_for(timeout=budget.ms(20))
            except Exception:
                result.problem = f"no widget control labelled {description!r} was rendered"
                continue
            control.scroll_into_view_if_needed(timeout=budget.ms(10))
            cell_outputs = control.locator("xpath=ancestor::div[contains(@class, 'jp-Cell-outputArea')]")
            before = control.evaluate(_JS_FIGURE_SRC)
            if not before:
                result.problem = "no figure after the control in its cell"
                continue
            name = re.sub(r"\W+", "_", description).strip("_") or "control"
            _shot(cell_outputs, out / f"2-{name}-before.png", result.screenshots, budget)
            _move_control(page, control, result, budget)
            try:
                page.wait_for_function(f"([c, before]) => ({_JS_FIGURE_SRC})(c) !== before",
                                       arg=[control.element_handle(), before], polling=200, timeout=budget.ms(30))
                result.figure_changed = True
            except Exception:
                result.problem = "the figure was not redrawn within 30 s after the control moved"
            result.value_after = _control_value(control, result.kind)
            if result.value_after == result.value_before:
                result.problem = (result.problem + "; " if result.problem else "") + "the control's value did not change"
            page.wait_for_timeout(300)
            _shot(cell_outputs, out / f"3-{name}-after.png", result.screenshots, budget)

        # Save from the page (File > Save Notebook) and read the file: output_type "error" is exact.
        _menu(page, "File", "Save Notebook", budget)
        for cell, error in _saved_errors(server.root / lesson.notebook, budget):
            if cell not in error_cells:  # an error the page did not show as one
                report.errors.append(f"cell {cell + 1}: {error} (in the saved notebook)")
        saved = server.root / lesson.notebook
        shutil.copy2(saved, out / Path(lesson.notebook).name)
    except Exception as e:  # a step that timed out or failed: record it with a picture of the page
        report.problems.append(f"{type(e).__name__}: {_clip(str(e), 800)}")
        try:
            _shot(page, out / "failure.png", report.screenshots, _Budget(time.monotonic() + 15))
        except Exception:
            pass
    finally:
        report.seconds = time.monotonic() - start
        page.context.close()
        server.shutdown_kernels()
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.txt").write_text(report.summary() + "\n")
    return report


def _wait_for_kernel(page, server: LabServer, notebook: str, report: LessonReport, budget: _Budget) -> None:
    """Wait until the notebook's kernel runs and the page is connected to it. Should JupyterLab ask which
    kernel to use, choose its default (the button a learner would press) and note it in the report."""
    end = time.monotonic() + budget.ms(90) / 1000
    while True:
        dialog = page.locator(".jp-Dialog")
        if dialog.count() and "Select Kernel" in dialog.first.inner_text():
            report.warnings.append("JupyterLab asked which kernel to use; the check chose its default")
            dialog.locator("button.jp-mod-accept").click(timeout=budget.ms(10))
        sessions = [s for s in server.api("GET", "/api/sessions") if s["path"] == notebook and s.get("kernel")]
        connected = page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\| Idle$")).count() > 0
        if sessions and sessions[0]["kernel"]["execution_state"] == "idle" and connected:
            return
        if time.monotonic() > end:
            raise TimeoutError("the notebook's kernel did not start and connect within 90 s")
        page.wait_for_timeout(250)


def _cell_sources(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c.get("source", "")) for c in nb["cells"]]


def _saved_errors(path: Path, budget: _Budget) -> list[tuple[int, str]]:
    """Error outputs stored in the notebook that the page saved (waits until the save has landed)."""
    end = time.monotonic() + budget.ms(20) / 1000
    while True:
        try:
            nb = json.loads(path.read_text(encoding="utf-8"))
            if any(c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"):
                break
        except (OSError, ValueError):
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"the page did not save {path.name} within 20 s")
        time.sleep(0.2)
    return [(i, f"{o.get('ename')}: {o.get('evalue')}") for i, cell in enumerate(nb["cells"])
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]


# ------------------------------------------------------------------------------------------ command


def run_check(lessons: list[LessonCheck], budget_s: float = 285.0, artifacts: Path = ARTIFACTS) -> list[LessonReport]:
    """The whole flow: one server, one browser, every lesson; everything stopped at the end."""
    missing = playwright_missing_reason()
    if missing:
        raise RuntimeError(missing)
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found: install it (Debian/Ubuntu: sudo apt-get install chromium) "
                           "or set COURSE_CHROMIUM to a Chrome or Chromium executable")
    deadline = time.monotonic() + budget_s
    with LabServer([lesson.notebook for lesson in lessons]) as server, Browser(chromium) as browser:
        try:
            return [check_lesson(server, browser, lesson, deadline, artifacts) for lesson in lessons]
        finally:
            artifacts.mkdir(parents=True, exist_ok=True)
            shutil.copy2(server.log_path, artifacts / "jupyterlab.log")


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_tools.workshop_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebooks to check (default: the lessons listed in LESSONS)")
    parser.add_argument("--control", action="append", default=[],
                        help="with one notebook: the label of a widget control to move (repeatable)")
    parser.add_argument("--budget", type=float, default=285.0, help="seconds for the whole check (default 285)")
    args = parser.parse_args(argv)
    os.environ.setdefault("COURSE_PROGRESS", "0")
    if args.notebooks:
        known = {lesson.notebook: lesson for lesson in LESSONS}
        lessons = []
        for nb in args.notebooks:
            path = Path(nb).resolve()
            if not path.is_file() or not path.is_relative_to(ROOT):
                print(f"workshop check: {nb} is not a notebook inside {ROOT}", file=sys.stderr)
                return 2
            rel = path.relative_to(ROOT).as_posix()
            lessons.append(LessonCheck(rel, tuple(args.control)) if args.control else known.get(rel, LessonCheck(rel)))
    else:
        lessons = available_lessons()
    print(f"Checking {len(lessons)} notebook(s) in JupyterLab with headless Chromium ...", flush=True)
    try:
        reports = run_check(lessons, budget_s=args.budget)
    except RuntimeError as e:
        print(f"workshop check could not run: {e}", file=sys.stderr)
        return 2
    for report in reports:
        print(report.summary(), flush=True)
    failed = [r.notebook for r in reports if not r.ok]
    print(f"\n{len(reports) - len(failed)} of {len(reports)} notebook(s) passed; screenshots in "
          f"{ARTIFACTS.relative_to(ROOT)}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
