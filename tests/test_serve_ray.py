"""``edgelora serve --ray`` on a local Ray cluster (loopback only): two replicas behind one OpenAI endpoint,
each tenant's requests routed to the replica where its adapter is warm, a replica killed under load."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from edgelora.errors import EdgeLoraError
from edgelora.runtime import EdgeModel
from edgelora.server import Settings
from edgelora.server.ray_app import APP_NAME, RayOptions, build_app, parse_arguments
from test_serve import KEYS, random_blob, sha, upload

PACKAGED = ["plain", "rs", "patterns"]
UPLOADED = ["u3", "u4", "u5"]
TENANTS = {f"t{i}": name for i, name in enumerate(PACKAGED + UPLOADED)}  # tenant -> its adapter
TENANT_KEYS = {tenant: f"sk-{tenant}-key" for tenant in TENANTS}
PROMPTS = ["Hello there", "The weather today", "Once upon a time", "Numbers: 1 2 3"]
TOKENS = 8


@pytest.fixture(scope="module")
def package(llama, tmp_path_factory) -> Path:
    pkg = tmp_path_factory.mktemp("ray") / "tiny"
    shutil.copytree(llama.package, pkg)
    return pkg


@pytest.fixture(scope="module")
def blobs(package, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("blobs")
    return {name: random_blob(package, folder, name, seed=30 + i) for i, name in enumerate(UPLOADED)}


@pytest.fixture(scope="module")
def reference(package, blobs) -> EdgeModel:
    model = EdgeModel.open(package)
    for name, blob in blobs.items():
        model.load_adapter(blob, name)
    return model


class RayServer:
    """Ray on loopback with the app deployed; ``stop`` shuts Serve and Ray down whatever happened."""

    def __init__(self, package: Path, keys: Path, uploads: Path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": self.port})
            options = RayOptions(replicas=2, adapters_per_replica=3, replica_cpus=0.5, max_batch=4, max_queue=16)
            serve.run(build_app(package, Settings(keys=keys, adapter_dir=uploads, max_tokens=128), options),
                      name=APP_NAME, route_prefix="/")
        except BaseException:
            self.stop()
            raise

    def client(self, tenant: str, retries: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=TENANT_KEYS[tenant], max_retries=retries,
                             timeout=60)

    def replicas(self) -> list[dict]:
        reply = httpx.get(self.url + "/v1/replicas", headers={"Authorization": f"Bearer {KEYS['admin']}"}, timeout=30)
        reply.raise_for_status()
        return reply.json()["data"]

    def retried(self) -> int:
        """Requests the ingress answered 503 (a replica died under them), from its /metrics."""
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"}, timeout=30).text
        return int(sum(sample.value for family in text_string_to_metric_families(text)
                       for sample in family.samples
                       if sample.name == "edgelora_requests_total" and sample.labels["status"] == "503"))

    def stop(self) -> None:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def cluster(package, blobs, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text("".join(f'[[key]]\nsha256 = "{sha(TENANT_KEYS[t])}"\ntenant = "{t}"\nadapters = ["{a}"]\n\n'
                            for t, a in TENANTS.items())
                    + f'[[key]]\nsha256 = "{sha(KEYS["admin"])}"\ntenant = "ops"\nadapters = ["*"]\nadmin = true\n')
    server = RayServer(package, keys, tmp_path_factory.mktemp("uploads"))
    try:
        for name, blob in blobs.items():
            assert upload(server, "admin", name, blob).status_code == 201
        yield server
    finally:
        server.stop()


def complete(server: RayServer, tenant: str, prompt: str, tokens: int = TOKENS, retries: int = 0) -> str:
    reply = server.client(tenant, retries).completions.create(model=TENANTS[tenant], prompt=prompt, max_tokens=tokens,
                                                              temperature=0)
    return reply.choices[0].text


def expected(reference: EdgeModel, tenant: str, prompt: str, tokens: int = TOKENS) -> str:
    return reference.generate(prompt, adapter=TENANTS[tenant], max_new_tokens=tokens).text


def by_adapter(replicas: list[dict], field: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for replica in replicas:
        for key, count in replica[field].items():
            totals[key] = totals.get(key, 0) + count
    return totals


def test_import_loads_no_torch():
    code = "import sys, edgelora.server.ray_app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_each_tenant_stays_on_the_replica_where_its_adapter_is_warm(cluster, reference):
    for tenant in TENANTS:  # first requests one by one, so Ray learns where each adapter went
        assert complete(cluster, tenant, PROMPTS[0]) == expected(reference, tenant, PROMPTS[0])
        time.sleep(1.0)
    work = [(tenant, prompt) for prompt in PROMPTS[1:] for tenant in TENANTS]  # interleaved tenants
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda job: complete(cluster, *job), work))
    assert answers == [expected(reference, tenant, prompt) for tenant, prompt in work]
    replicas = cluster.replicas()
    assert len(replicas) == 2 and all(1 <= len(r["warm"]) <= 3 for r in replicas)
    assert by_adapter(replicas, "requests") == {adapter: len(PROMPTS) for adapter in TENANTS.values()}
    assert by_adapter(replicas, "loads") == {adapter: 1 for adapter in TENANTS.values()}, replicas


def test_a_replica_killed_under_load_loses_no_retried_request(cluster, reference):
    tokens = 96  # long enough that the first answer back finds the others mid-generation
    before = {r["id"]: r for r in cluster.replicas()}
    victim = max(before.values(), key=lambda r: len(r["warm"]))
    survivor = next(r for r in before.values() if r["id"] != victim["id"])
    work = [(tenant, prompt) for prompt in PROMPTS for tenant in TENANTS]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(complete, cluster, tenant, prompt, tokens, 6) for tenant, prompt in work]
        wait(futures, timeout=120, return_when=FIRST_COMPLETED)
        namespace = next(a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["name"] == victim["actor"])
        ray.kill(ray.get_actor(victim["actor"], namespace=namespace), no_restart=True)
        answers = [future.result(timeout=240) for future in futures]
    assert answers == [expected(reference, tenant, prompt, tokens) for tenant, prompt in work]
    assert cluster.retried() >= 1  # the kill did hit requests, which the client retried
    for tenant in TENANTS:  # served on after the kill, the killed replica's tenants too
        assert complete(cluster, tenant, PROMPTS[0], tokens, 6) == expected(reference, tenant, PROMPTS[0], tokens)
    after = {r["id"]: r for r in cluster.replicas()}
    assert sum(after[survivor["id"]]["requests"].values()) > sum(survivor["requests"].values())


def test_an_adapter_uploaded_again_under_its_name_is_served_new_everywhere(cluster, reference, tmp_path):
    tenant, name = "t5", "u5"
    complete(cluster, tenant, PROMPTS[0])  # warm on some replica
    headers = {"Authorization": f"Bearer {KEYS['admin']}"}
    assert httpx.delete(f"{cluster.url}/v1/adapters/{name}", headers=headers, timeout=30).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(cluster, tenant, PROMPTS[0])
    blob = random_blob(reference.package, tmp_path, name, seed=99)
    assert upload(cluster, "admin", name, blob).status_code == 201
    reference.load_adapter(blob, name)
    for prompt in PROMPTS:
        assert complete(cluster, tenant, prompt) == expected(reference, tenant, prompt)


def test_embeddings_go_to_a_replica(cluster, tmp_path_factory):
    from edgelora.exporters.package_writer import export_package
    from edgelora.demo.tiny_models import build_encoder, random_peft_adapter

    folder = tmp_path_factory.mktemp("encoder")
    base = build_encoder(folder / "base", task="feature-extraction")
    random_peft_adapter(base, folder / "lora", seed=3, targets=("query", "value"))
    export_package(folder / "base", {"tenant": folder / "lora"}, folder / "pkg", progress=False)
    reference = EdgeModel.open(folder / "pkg")
    serve.run(build_app(folder / "pkg", Settings(), RayOptions(replicas=1, replica_cpus=0.5)), name="encoder",
              route_prefix="/encoder")
    try:
        client = openai.OpenAI(base_url=cluster.url + "/encoder/v1", api_key="none", max_retries=0, timeout=60)
        texts = ["a short text", "another one"]
        got = client.embeddings.create(model="tenant", input=texts)
        np.testing.assert_allclose([d.embedding for d in got.data], reference.embed(texts, adapter="tenant",
                                                                                     normalize=True), atol=1e-6)
        assert got.usage.prompt_tokens == int(reference.tokenize(texts)["attention_mask"].sum())
    finally:
        serve.delete("encoder")


def test_serve_run_arguments_reach_the_settings_and_options(tmp_path):
    package, settings, options = parse_arguments({"package": "pkg", "keys": "k.toml", "max_tokens": "64",
                                                  "replicas": "3", "replica_memory_mb": "12.5",
                                                  "route_by_adapter": False})  # YAML gives a bool
    assert (package, settings.keys, settings.max_tokens) == (Path("pkg"), Path("k.toml"), 64)
    assert (options.replicas, options.replica_memory_mb, options.route_by_adapter) == (3, 12.5, False)
    for args, message in [({"keys": "k"}, "package: missing"),
                          ({"package": "p", "replicas": "two"}, "replicas: expected an int"),
                          ({"package": "p", "port": "80"}, "port: unknown argument"),
                          ({"package": "p", "route_by_adapter": "no"}, "route_by_adapter: expected true or false")]:
        with pytest.raises(EdgeLoraError, match=message):
            parse_arguments(args)


def test_a_wrong_package_path_fails_before_ray_starts(tmp_path):
    with pytest.raises(EdgeLoraError, match="not a package directory"):
        build_app(tmp_path / "missing", Settings(), RayOptions())
    with pytest.raises(EdgeLoraError, match="adapters-per-replica must be at least 1"):
        RayOptions(adapters_per_replica=0).check()
