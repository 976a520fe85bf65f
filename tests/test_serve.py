"""`rm-scale serve` and `rm-scale score` for real (#16): a server process and HTTP clients on loopback, the score
command in subprocesses — killed at an exact point and resumed, and on 2 ranks against 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from launch import ROOT, env, free_port
from rm_scale.scoring import RewardScorer

pytestmark = pytest.mark.slow

DEMO_EVAL = ROOT / "rm_scale" / "data" / "demo_data" / "eval.jsonl"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def server(trained_export, tmp_path_factory):
    httpx = pytest.importorskip("httpx")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "rm_scale", "serve", "--model", str(trained_export), "--port", str(port),
           "--max-wait-ms", "200", "--max-request-bytes", "20000"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), "RM_SCALE_SERVE_TOKEN": TOKEN}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError(f"the server did not come up: {log.read_text()[-3000:]}")
    yield url, proc, log
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def _texts(n=24):
    rows = [json.loads(line) for line in DEMO_EVAL.read_text().splitlines()[:n]]
    return [r["prompt"] + (r["chosen"] if i % 2 else r["rejected"]) for i, r in enumerate(rows)]


def _post(url, path, body, *, token=TOKEN, raw=None):
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        return httpx.post(url + path, content=raw, headers={**headers, "Content-Type": "application/json"},
                          timeout=60)
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def test_concurrent_clients_get_the_offline_rewards_in_shared_forwards(server, trained_export):
    url, _, _ = server
    texts = _texts()
    offline = RewardScorer(str(trained_export)).score(texts)
    requests = [texts[i : i + 3] for i in range(0, len(texts), 3)] * 2  # 16 requests from 8 clients at once
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: _post(url, "/get_reward", {"query": q}), requests))
    for query, answer in zip(requests, answers):
        assert answer.status_code == 200, answer.text
        want = [offline[texts.index(t)] for t in query]
        assert answer.json()["rewards"] == pytest.approx(want, abs=1e-5)
        assert answer.json()["scores"] == answer.json()["rewards"]  # OpenRLHF's newer key
    import httpx

    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["requests"] >= len(requests)
    assert health["batches"] < health["requests"] and health["largest_batch_requests"] > 1  # dynamic batching
    # the JSON endpoint for prompt/response pairs and messages
    answer = _post(url, "/score", {"prompts": ["name a colour", [{"role": "user", "content": "hi"}]],
                                   "responses": [" blue", "hello"]})
    assert answer.status_code == 200, answer.text
    scorer = RewardScorer(str(trained_export))
    want = [scorer.score(["name a colour"], [" blue"])[0],
            scorer.score([[{"role": "user", "content": "hi"}]], ["hello"])[0]]
    assert answer.json()["rewards"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("body, raw, message", [
    (None, b"{not json", "not valid JSON"),
    (["a"], None, "must be a JSON object"),
    ({"query": "a text"}, None, "must be a list"),
    ({"query": []}, None, "empty list"),
    ({"query": ["ok", 3]}, None, "query[1] must be a string"),
    ({"texts": ["x"] * 3, "query": None}, None, "must be a list"),  # /get_reward reads query only
    ({"query": ["word " * 6000]}, None, "bytes"),  # over --max-request-bytes
])
def test_bad_requests_get_a_400_and_the_server_keeps_serving(server, body, raw, message):
    url, proc, _ = server
    answer = _post(url, "/get_reward", body, raw=raw)
    assert answer.status_code == 400, answer.text
    if message:
        assert message in answer.json()["error"]
    assert proc.poll() is None
    assert _post(url, "/get_reward", {"query": ["still serving"]}).status_code == 200


def test_the_bearer_token_is_required_and_never_printed(server):
    url, _, log = server
    assert _post(url, "/get_reward", {"query": ["x"]}, token=None).status_code == 401
    assert _post(url, "/get_reward", {"query": ["x"]}, token="wrong").status_code == 401
    assert _post(url, "/score", {"prompts": ["a"], "responses": ["b"]}, token=None).status_code == 401
    text = log.read_text()
    assert "127.0.0.1" in text and "RM_SCALE_SERVE_TOKEN" in text and TOKEN not in text


# ---- rm-scale score -----------------------------------------------------------------------------------------------

def _rows_file(tmp_path, n=40):
    rows = [json.loads(line) for line in DEMO_EVAL.read_text().splitlines()[:n]]
    path = tmp_path / "rows.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            kind = i % 4
            if kind == 0:
                f.write(json.dumps({"text": r["prompt"] + r["chosen"]}) + "\n")
            elif kind == 1:
                f.write(json.dumps({"prompt": r["prompt"], "response": r["rejected"]}) + "\n")
            else:
                f.write(json.dumps(r) + "\n")  # a preference pair (prompt, chosen, rejected)
            if i == 7:
                f.write("{broken json\n")
    return path, rows


def _score(args, *, extra_env=None, nproc=1):
    base = ["-m", "rm_scale", "score", *args]
    if nproc == 1:
        cmd = [sys.executable, *base]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *base]
    return subprocess.run(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=600)


def _check_scores(out, path, rows, scorer):
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in lines] == sorted((str(path), r["line"]) for r in lines)
    assert len(lines) == len(rows) and len({r["line"] for r in lines}) == len(rows)  # each row once
    for line in lines:
        i = line["line"] - 1 - (line["line"] > 9)  # the broken line is line 9
        r, kind = rows[i], i % 4
        if kind == 0:
            assert line["reward"] == pytest.approx(scorer.score([r["prompt"] + r["chosen"]])[0], abs=1e-5)
        elif kind == 1:
            assert line["reward"] == pytest.approx(scorer.score([r["prompt"]], [r["rejected"]])[0], abs=1e-5)
        else:
            chosen, rejected = scorer.score_pairs([(r["prompt"], r["chosen"], r["rejected"])])[0]
            assert (line["chosen_reward"], line["rejected_reward"]) == pytest.approx((chosen, rejected), abs=1e-5)
            assert line["margin"] == pytest.approx(chosen - rejected, abs=1e-5)


def test_score_writes_every_row_in_order_and_counts_the_bad_one(trained_export, tmp_path):
    path, rows = _rows_file(tmp_path)
    out = tmp_path / "scores.jsonl"
    proc = _score(["--model", str(trained_export), "--data", str(path), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_scores(out, path, rows, RewardScorer(str(trained_export)))
    report = json.loads((tmp_path / "scores.jsonl.report.json").read_text())
    assert report["rows"] == len(rows) and report["skipped"] == {"malformed JSON": 1}
    assert f"{path}:9" in report["skipped_examples"]["malformed JSON"][0]
    assert not (tmp_path / "scores.jsonl.parts").exists()


def test_score_killed_mid_run_resumes_without_losing_or_repeating_rows(trained_export, tmp_path):
    path, rows = _rows_file(tmp_path)
    out = tmp_path / "scores.jsonl"
    args = ["--model", str(trained_export), "--data", str(path), "--out", str(out), "--rows-per-batch", "8"]
    cmd = [sys.executable, "-m", "rm_scale", "score", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), "RM_SCALE_HOLD_AT": "score:rows-16"},
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # held after the second batch of 8 was written and flushed
        if "holding at score:rows-16" in line:
            break
    proc.kill()
    proc.wait(timeout=30)
    part = tmp_path / "scores.jsonl.parts" / "rank0.jsonl"
    with open(part, "a") as f:
        f.write('{"file": "cut short by the kil')  # a line a kill can leave half-written
    assert not out.exists() and len(part.read_text().splitlines()) == 17
    resumed = _score(args)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "24 scored now" in resumed.stdout  # the 16 rows already written are not scored again
    _check_scores(out, path, rows, RewardScorer(str(trained_export)))


def test_score_on_two_ranks_equals_one_process(trained_export, tmp_path):
    path, rows = _rows_file(tmp_path)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    for out, n in ((one, 1), (two, 2)):
        proc = _score(["--model", str(trained_export), "--data", str(path), "--out", str(out)], nproc=n)
        assert proc.returncode == 0, proc.stderr[-4000:]
    a = [json.loads(line) for line in one.read_text().splitlines()]
    b = [json.loads(line) for line in two.read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in a] == [(r["file"], r["line"]) for r in b]
    for x, y in zip(a, b):
        for key in ("reward", "chosen_reward", "rejected_reward"):
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=1e-5)
    assert json.loads((tmp_path / "two.jsonl.report.json").read_text())["world_size"] == 2
