"""Starting the real Flower processes: the server (a SuperLink that runs medpipe's ServerApp) and a
site (a SuperNode that runs medpipe's ClientApp on the site's data folder).

    medpipe fl server --out RUN --certs CERTS --site-keys CERTS/sites/*.pub [--rounds 5 --min-sites 2 ...]
    medpipe fl site --data SITE_DATA --server 127.0.0.1:9092 --ca CERTS/ca.crt --key CERTS/sites/NAME

``fl server`` starts ``flower-superlink`` with TLS and SuperNode authentication (only the registered
site keys may connect), registers each site's public key under its name (``flwr supernode
register``), writes the run configuration, submits the Flower App with ``flwr run`` and streams its
log until the run ends, then stops the SuperLink. Run it again with the same ``--out`` after a
crash: the ServerApp resumes after the last checkpointed round. What the server accepts from a site
is set here too (``--aggregation mean|median|trimmed-mean``, ``--trim``, ``--max-update-ratio``,
``--max-examples``, ``--site-examples NAME=N``; ``fl simulate`` registers each site folder's image
count) and checked by ``medpipe.fl.aggregate`` (docs/federated-security.md). ``fl site`` replaces itself with
``flower-supernode`` and starts it again whenever it exits (server down or restarted), so a site
rejoins by itself; SIGTERM stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from medpipe.config import make_config
from medpipe.data.sources import load_records
from medpipe.data.synthetic import HAM_CLASSES
from medpipe.errors import MedpipeError
from medpipe.fl.aggregate import MAX_EXAMPLES, MAX_UPDATE_RATIO, METHODS, TRIM_FRACTION
from medpipe.fl.certs import check_site_name, make_certs
from medpipe.fl.partition import partition
from medpipe.fl.server import CONFIG_FILE, SITES_FILE, STATE_FILE
from medpipe.fl.strategy import algorithm_config
from medpipe.pipeline import load_handler
from medpipe.utils import atomic_write_text

APP_PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "medpipe-fl"
version = "1.0.0"
description = "medpipe federated training (ServerApp and ClientApp from the installed medpipe)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "medpipe"

[tool.flwr.app.components]
serverapp = "medpipe_fl_app.server:app"
clientapp = "medpipe_fl_app.client:app"

[tool.flwr.app.config]
run-dir = ""
"""


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment."""
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise MedpipeError(f"{name} not found: install the fl extra (pip install 'medpipe-imaging[fl]')")
    return found


def _env(flwr_home: Path) -> dict:
    env = dict(os.environ, FLWR_HOME=str(flwr_home))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flower-superexec etc.
    return env


def write_app(folder: Path) -> Path:
    """The Flower App that ``flwr run`` ships: a pyproject and two one-line modules importing medpipe's apps."""
    pkg = folder / "medpipe_fl_app"
    pkg.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text("from medpipe.fl.apps import server_app\n\napp = server_app\n")
    (pkg / "client.py").write_text("from medpipe.fl.apps import client_app\n\napp = client_app\n")
    return folder


def _wait_tls(host: str, port: int, ca: Path, timeout: float, proc: subprocess.Popen, logfile: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise MedpipeError(f"the SuperLink exited with status {proc.returncode}; see {logfile}")
        try:
            with socket.create_connection((host, port), timeout=2) as s, ctx.wrap_socket(s, server_hostname=host):
                return
        except OSError:
            time.sleep(0.5)
    raise MedpipeError(f"the SuperLink did not accept TLS connections on {host}:{port} within {timeout:g}s; see {logfile}")


def _stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Stop a process we started and everything it started (its process group is ours: collect the
    descendants by parent id, then SIGTERM, then SIGKILL the ones still alive)."""
    if proc is None or proc.poll() is not None:
        return
    family = _descendants(proc.pid) + [proc.pid]
    for pid in family:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def run_server(run_dir: str | os.PathLike, *, certs: str | os.PathLike | None, site_keys: list[str], host: str = "127.0.0.1",
               port: int = 9092, rounds: int = 5, min_sites: int = 2, fraction: float = 1.0, strategy: str = "fedavg",
               mu: float = 0.01, local_epochs: int = 1, classes: list[str] | None = None, train_config: dict | None = None,
               round_timeout: float = 3600.0, straggler_wait: float = 120.0, wait_for_sites: float = 600.0,
               insecure: bool = False, round_callbacks: list[str] | None = None, aggregation: str = "mean",
               trim: float = TRIM_FRACTION, max_update_ratio: float = MAX_UPDATE_RATIO,
               max_examples: int = MAX_EXAMPLES, site_examples: dict[str, int] | None = None,
               algorithm: dict | None = None) -> dict:
    """Run a federated training to the end (or resume one); returns the final state summary.
    ``algorithm``: the keys of :func:`medpipe.fl.strategy.algorithm_config` (learning rate across rounds,
    local optimiser and BatchNorm policies, server optimiser; the defaults where left out).
    ``aggregation``/``trim``, ``max_update_ratio``, ``max_examples`` and ``site_examples`` (site name ->
    registered image count) are the server's checks of site replies (``medpipe.fl.aggregate``)."""

    if strategy not in ("fedavg", "fedprox"):
        raise MedpipeError(f"--strategy must be fedavg or fedprox, got {strategy!r}")
    guard = guard_config(aggregation, trim, max_update_ratio, max_examples, site_examples, site_keys)
    try:
        algo = algorithm_config(**(algorithm or {}))
    except ValueError as exc:
        raise MedpipeError(str(exc)) from None
    if rounds < 1 or min_sites < 1 or not 0 < fraction <= 1 or local_epochs < 1:
        raise MedpipeError("--rounds, --min-sites and --local-epochs must be >= 1 and --fraction in (0, 1]")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = make_config(train_config or {}).validate()
    cfg = {"rounds": rounds, "min_sites": min_sites, "fraction": fraction, "strategy": strategy, "mu": mu,
           "local_epochs": local_epochs, "classes": list(classes or HAM_CLASSES), "train_config": tc.to_dict(),
           "round_timeout": round_timeout, "straggler_wait": straggler_wait, "wait_for_sites": wait_for_sites,
           "round_callbacks": list(round_callbacks or []), "engine": "flower", **guard, **algo}
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(cfg, indent=2))
    certs, ca, keys = _server_credentials(certs, site_keys, insecure)

    home = run_dir / "flwr_home"
    home.mkdir(exist_ok=True)
    conn = f'[superlink]\ndefault = "medpipe"\n\n[superlink.medpipe]\naddress = "{host}:{port}"\n'
    conn += "insecure = true\n" if insecure else f'root-certificates = "{ca.resolve()}"\n'
    (home / "config.toml").write_text(conn)
    env = _env(home)
    link_log = run_dir / "superlink.log"
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    cmd += ["--insecure"] if insecure else ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(certs / "server.pem"),
                                            "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"]
    link = None
    try:
        with open(link_log, "ab") as fh:
            link = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
        if insecure:
            _wait_port(host, port, 60, link, link_log)
        else:
            _wait_tls(host, port, ca, 60, link, link_log)
        print(f"SuperLink on {host}:{port} ({'insecure' if insecure else 'TLS, site authentication on'}); "
              f"log {link_log}", flush=True)
        names = {}
        for k in keys:
            name = k.name.removesuffix(".pub")
            out = _flwr(["supernode", "register", str(k), "medpipe", "--name", name, "--format", "json"], env, run_dir)
            names[str(int(out["node-id"]))] = name
            print(f"registered site {name} (node {out['node-id']})", flush=True)
        atomic_write_text(run_dir / SITES_FILE, json.dumps(names, indent=2))
        app = write_app(run_dir / "flwr_app")
        res = subprocess.run([_bin("flwr"), "run", str(app), "medpipe", "--run-config", f'run-dir="{run_dir}"',
                              "--stream"], env=env, cwd=run_dir)
        state = json.loads((run_dir / STATE_FILE).read_text()) if (run_dir / STATE_FILE).is_file() else {}
        if state.get("status") != "finished":
            raise MedpipeError(f"the federated run did not finish (flwr run exited {res.returncode}; round "
                               f"{state.get('round', 0)} of {rounds} checkpointed); see {run_dir / 'fl_server.log'} "
                               f"and {link_log}; run the same command again to resume")
        return {"run_dir": str(run_dir), "model_dir": str(run_dir / "model"), "rounds": state["round"],
                "best_round": state["best_round"], "best_pooled_auc": state["best_pooled_auc"]}
    finally:
        _stop(link)


def _server_credentials(certs, site_keys: list[str], insecure: bool) -> tuple[Path | None, Path | None, list[Path]]:
    """(the certificate folder, its CA certificate, the sites' public keys), each checked; no TLS with
    ``insecure``."""
    if insecure:
        ca = None
        print("WARNING: --insecure: no TLS and no site authentication; for a loopback experiment only", flush=True)
    else:
        if not certs:
            raise MedpipeError("--certs CERTS is required (make them with 'medpipe fl certs'), or --insecure")
        certs = Path(certs).resolve()
        ca = certs / "ca.crt"
        for f in (ca, certs / "server.pem", certs / "server.key"):
            if not f.is_file():
                raise MedpipeError(f"{f} is missing; make the set with 'medpipe fl certs --out {certs} --sites ...'")
    keys = [Path(k).resolve() for k in site_keys]
    for k in keys:
        if not k.is_file():
            raise MedpipeError(f"site public key {k} does not exist")
        check_site_name(k.name.removesuffix(".pub"))
    if not insecure and not keys:
        raise MedpipeError("--site-keys: give the public key of every site allowed to join (CERTS/sites/*.pub)")
    return certs, ca, keys


def guard_config(aggregation: str, trim: float, max_update_ratio: float, max_examples: int,
                 site_examples: dict[str, int] | None, site_keys: list[str]) -> dict:
    """The server's limits on site replies as run-configuration entries, checked before anything starts
    (``site_keys``: the sites' public key files, whose names ``site_examples`` must use)."""
    site_examples = dict(site_examples or {})
    site_names = [Path(k).name.removesuffix(".pub") for k in site_keys]
    if aggregation not in METHODS:
        raise MedpipeError(f"--aggregation must be one of {', '.join(METHODS)}, got {aggregation!r}")
    if not 0.0 <= trim < 0.5:
        raise MedpipeError(f"--trim must be in [0, 0.5), got {trim}")
    if not (max_update_ratio > 0 and max_update_ratio != float("inf")):
        raise MedpipeError(f"--max-update-ratio must be a positive number, got {max_update_ratio}")
    if max_examples < 1:
        raise MedpipeError(f"--max-examples must be >= 1, got {max_examples}")
    unknown = sorted(set(site_examples) - set(site_names)) if site_names else []
    if unknown:
        raise MedpipeError(f"--site-examples names {unknown}, which are not among the sites' keys {sorted(site_names)}")
    bad = {k: v for k, v in site_examples.items() if not isinstance(v, int) or v < 1}
    if bad:
        raise MedpipeError(f"--site-examples: counts must be positive integers, got {bad}")
    return {"aggregation": aggregation, "trim": float(trim), "max_update_ratio": float(max_update_ratio),
            "max_examples": int(max_examples), "site_examples": site_examples}


def _wait_port(host: str, port: int, timeout: float, proc, logfile) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise MedpipeError(f"the SuperLink exited with status {proc.returncode}; see {logfile}")
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise MedpipeError(f"the SuperLink did not listen on {host}:{port} within {timeout:g}s; see {logfile}")


def _flwr(args: list[str], env: dict, cwd: Path) -> dict:
    res = subprocess.run([_bin("flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    try:
        out = json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        raise MedpipeError(f"flwr {' '.join(args[:2])} failed: {(res.stdout + res.stderr).strip()[-400:]}") from None
    if not out.get("success", False):
        raise MedpipeError(f"flwr {' '.join(args[:2])} failed: {out.get('error-message', out)}")
    return out


def site_command(data: str | os.PathLike, *, server: str, ca: str | None, key: str | None, name: str | None = None,
                 runtime_port: int = 9094, overrides: dict | None = None, insecure: bool = False,
                 handlers: list[str] | None = None) -> list[str]:
    """The ``flower-supernode`` command line for this site (validated first). ``handlers``: training event
    handlers (``MODULE:NAME[:ARG,...]``, importable where the site runs) for each round's local training."""

    data = Path(data).resolve()
    load_records(data)  # an ingested folder, or a clear error
    name = check_site_name(name or (Path(key).name if key else data.name))
    if handlers:
        for spec in handlers:
            if "'" in spec:  # Flower's --node-config quotes the list with single quotes
                raise MedpipeError(f"--handler {spec!r}: a handler spec cannot contain a single quote")
            load_handler(spec)  # a wrong spec is this command's error, not a failure inside every round
    cmd = [_bin("flower-supernode"), "--superlink", server, "--port", str(runtime_port),
           "--node-config", f'data-dir="{data}" site="{name}" overrides=\'{json.dumps(overrides or {})}\' '
                            f'handlers=\'{json.dumps(list(handlers or []))}\'']
    if insecure:
        return cmd + ["--insecure"]
    if not ca or not Path(ca).is_file():
        raise MedpipeError(f"--ca {ca}: the federation's CA certificate is required (or --insecure)")
    if not key or not Path(key).is_file():
        raise MedpipeError(f"--key {key}: this site's private key is required (or --insecure)")
    return cmd + ["--root-certificates", str(Path(ca).resolve()), "--auth-supernode-private-key", str(Path(key).resolve())]


def _server_up(address: str, ca: str | None) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2) as s:
            if ca:
                ssl.create_default_context(cafile=str(ca)).wrap_socket(s, server_hostname=host.strip("[]")).close()
        return True
    except (OSError, ValueError):
        return False


def _die_with_parent() -> None:
    """In the SuperNode child: receive SIGKILL when the `fl site` process dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_site(data, *, retry_wait: float = 5.0, **kw) -> int:
    """Keep this site in the federation: wait for the server, run ``flower-supernode``, and start it
    again when it exits with an error (the server was down or restarted); SIGTERM/SIGINT stop it."""
    cmd = site_command(data, **kw)
    env = _env(Path(data).resolve() / "flwr_home")
    Path(data).resolve().joinpath("flwr_home").mkdir(exist_ok=True)
    stopping = {"sig": None}
    child: subprocess.Popen | None = None

    def _stop_site(signum, _frame):
        stopping["sig"] = signum
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop_site)
    signal.signal(signal.SIGINT, _stop_site)
    announced = False
    while stopping["sig"] is None:
        if not _server_up(kw["server"], None if kw.get("insecure") else kw.get("ca")):
            if not announced:
                print(f"waiting for the server at {kw['server']}", flush=True)
                announced = True
            time.sleep(retry_wait / 5)
            continue
        announced = False
        print("starting " + " ".join(cmd), flush=True)
        child = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
        rc = child.wait()
        if stopping["sig"] is not None:
            break
        print(f"flower-supernode exited with status {rc}; rejoining when the server is reachable", flush=True)
        time.sleep(retry_wait)
    return 0


def simulate(data: str | os.PathLike, run_dir: str | os.PathLike, *, by: str | None = None, sites: int = 0,
             dirichlet: float | None = None, seed: int = 0, port: int = 9092, threads: int = 1, **server_kw) -> dict:
    """One machine, real processes: partition ``data`` into site folders, make credentials, start one
    ``medpipe fl site`` process per site and run the server until the run ends; the sites are stopped."""

    run_dir = Path(run_dir).resolve()
    parts = partition(data, run_dir / "sites", by=by, sites=sites, dirichlet=dirichlet, seed=seed)
    names = sorted(parts["sites"])
    certs = run_dir / "certs"
    if not (certs / "ca.crt").is_file() or any(not (certs / "sites" / n).is_file() for n in names):
        make_certs(certs, names)
    procs = []
    try:
        for i, name in enumerate(names):
            log = open(run_dir / f"site_{name}.log", "ab")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "medpipe", "fl", "site", "--data", str(run_dir / "sites" / name),
                 "--server", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"), "--key", str(certs / "sites" / name),
                 "--runtime-port", str(port + 10 + i), "--threads", str(threads)],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS=str(threads))))
        print(f"{len(names)} sites started ({', '.join(names)}); logs {run_dir}/site_*.log", flush=True)
        # each site's registered image count is its folder's size: no site may report more training images
        registered = {n: int(parts["sites"][n]["images"]) for n in names}
        server_kw["site_examples"] = {**registered, **(server_kw.get("site_examples") or {})}
        return run_server(run_dir / "server", certs=certs, site_keys=[str(certs / "sites" / f"{n}.pub") for n in names],
                          host="127.0.0.1", port=port, **server_kw)
    finally:
        for p in procs:
            _stop(p)
