"""Where messages go. The driver's messages go through ``logging`` (``--quiet``/``--verbose``)
and into ``<run>/logs/driver.log``; every role's process (vLLM engines, reward, reference, the
learner's and the stages' Ray Train workers) writes its stdout/stderr to ``<run>/logs/<role>.log``
instead of Ray's forwarding to the driver, whose late, unordered lines would otherwise land
after the final tables. A failed role's last lines are shown with its error (``tail``)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

LOG_DIR_ENV = "RLHF_RAY_LOG_DIR"  # set for the roles by launch.spawn
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}

log = logging.getLogger("rlhf_ray")


def log_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "logs"


def setup_logging(level: str = "normal") -> None:
    """The ``rlhf_ray`` loggers print ``rlhf-ray: message`` to stderr at ``level``."""
    log.setLevel(logging.DEBUG)
    for h in list(log.handlers):
        if getattr(h, "_rlhf_console", False):
            log.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(LEVELS[level])
    console.setFormatter(logging.Formatter("rlhf-ray: %(message)s"))
    console._rlhf_console = True  # type: ignore[attr-defined]
    log.addHandler(console)


_run_log: Optional[logging.FileHandler] = None  # the one driver.log being written


def log_to_run_dir(run_dir: Path) -> Path:
    """Also keep every driver message (debug included) in ``<run>/logs/driver.log``: one file
    at a time, so a process that runs several trainers writes each run's messages to its own."""
    global _run_log
    path = (log_dir(run_dir) / "driver.log").resolve()
    if _run_log is not None and Path(_run_log.baseFilename) == path:
        return path
    close_run_log()
    path.parent.mkdir(parents=True, exist_ok=True)
    _run_log = logging.FileHandler(path)
    _run_log.setLevel(logging.DEBUG)
    _run_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(_run_log)
    log.setLevel(logging.DEBUG)
    if not any(getattr(h, "_rlhf_console", False) for h in log.handlers) and not logging.getLogger().handlers:
        # Used as a library (no CLI, no logging set up): warnings still reach the screen, which
        # Python's last-resort handler stops doing once the file handler exists.
        setup_logging("quiet")
    return path


def close_run_log() -> None:
    global _run_log
    if _run_log is not None:
        log.removeHandler(_run_log)
        _run_log.close()
        _run_log = None


def redirect_output(name: str, directory: Optional[str] = None) -> Optional[Path]:
    """Send this process's stdout and stderr (file descriptors, so C++ and child processes'
    output too) to ``<directory>/<name>.log``; ``directory`` defaults to ``$RLHF_RAY_LOG_DIR``
    (nothing happens when neither is set: a role built in a test keeps its output)."""
    directory = directory or os.environ.get(LOG_DIR_ENV)
    if not directory:
        return None
    path = Path(directory) / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path


def tail(run_dir: Path, role: str, lines: int = 15) -> str:
    """The last ``lines`` lines of every log of ``role`` (``learner`` has one per rank), or ""."""
    out = []
    d = log_dir(run_dir)
    for path in sorted(d.glob(f"{role}.log")) + sorted(d.glob(f"{role}-rank*.log")):
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        if text:
            out.append(f"--- last lines of {path} ---\n" + "\n".join(text))
    return "\n".join(out)


def link_ray_logs(run_dir: Path) -> Optional[Path]:
    """``<run>/logs/ray`` -> this node's Ray session logs (Ray Train's controller, raylet,
    the workers' own files), so everything of a run is found from its directory."""
    try:
        import ray

        target = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API for it
    except Exception:
        return None
    link = log_dir(run_dir) / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    except OSError:
        return None
    return link
