#!/usr/bin/env python3
"""A client in another language, written only from the proto and the README.

Generates Python stubs from proto/ with grpcio-tools, starts the docsidecar
binary on a free port (memory store) and checks the contract as a Python user
would see it: dict documents, status codes, pagination, atomic writes, health
and reflection. Usage: python_client.py path/to/docsidecar
"""
import json
import os
import subprocess
import sys
import tempfile
import threading

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = tempfile.mkdtemp(prefix="docsidecar-py-")
proto_include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
rc = protoc.main([
    "grpc_tools.protoc", f"-I{os.path.join(ROOT, 'proto')}", f"-I{proto_include}",
    f"--python_out={OUT}", f"--grpc_python_out={OUT}", "docsidecar/v1/document_service.proto",
])
assert rc == 0, "protoc failed"
sys.path.insert(0, OUT)

from docsidecar.v1 import document_service_pb2 as pb  # noqa: E402
from docsidecar.v1 import document_service_pb2_grpc as rpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from google.protobuf.struct_pb2 import Struct  # noqa: E402

passed, failed = 0, 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok   {name}")
    except Exception as e:  # report and go on: one line per check
        failed += 1
        print(f"FAIL {name}: {e!r}")


def struct(d):
    s = Struct()
    s.update(d)
    return s


def expect_code(code, fn, contains=""):
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == code, f"{e.code()} != {code}: {e.details()}"
        assert contains in e.details(), f"{contains!r} not in {e.details()!r}"
        return
    raise AssertionError(f"expected {code}, call succeeded")


binary = sys.argv[1]
proc = subprocess.Popen(
    [binary, "--listen", "127.0.0.1:0", "--database-url", "memory://"],
    env={"DOCSIDECAR_LOG_FORMAT": "json", "RUST_LOG": "info", "PATH": os.environ.get("PATH", "")},
    stdout=subprocess.PIPE, text=True,
)
addr = None
for line in proc.stdout:
    entry = json.loads(line)
    if entry.get("message") == "serving docsidecar.v1.DocumentService":
        addr = entry["listen"]
        break
assert addr, "the server did not start"
threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()

channel = grpc.insecure_channel(addr)
docs = rpc.DocumentServiceStub(channel)


def round_trip():
    data = {"name": "Ada", "age": 36, "tags": ["math", "engines"], "nested": {"ok": True, "none": None}}
    saved = docs.Save(pb.SaveRequest(collection="people", id="ada", data=struct(data)))
    assert saved.created and saved.rev
    got = docs.Get(pb.GetRequest(collection="people", id="ada"))
    assert json_format.MessageToDict(got.data) == data, json_format.MessageToDict(got.data)
    assert got.rev == saved.rev
    assert got.create_time.seconds > 0


def generated_id():
    saved = docs.Save(pb.SaveRequest(collection="people", data=struct({"x": 1})))
    assert saved.id and saved.created


def statuses():
    expect_code(grpc.StatusCode.NOT_FOUND, lambda: docs.Get(pb.GetRequest(collection="people", id="nobody")))
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: docs.Get(pb.GetRequest(collection="Bad!", id="x")),
                "^[a-z][a-z0-9_]{0,62}$")
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: docs.Save(pb.SaveRequest(collection="people", id="x")),
                "data is required")
    expect_code(grpc.StatusCode.ABORTED, lambda: docs.Save(
        pb.SaveRequest(collection="people", id="ada", data=struct({}), expected_rev="stale")))
    expect_code(grpc.StatusCode.ALREADY_EXISTS, lambda: docs.Save(
        pb.SaveRequest(collection="people", id="ada", data=struct({}), create_only=True)))
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: docs.List(pb.ListRequest(collection="people", page_size=-1)))
    expect_code(grpc.StatusCode.INVALID_ARGUMENT,
                lambda: docs.List(pb.ListRequest(collection="people", page_token="not-a-token")))


def pagination():
    ids = [f"p{i:03d}" for i in range(25)]
    docs.Write(pb.WriteRequest(mutations=[
        pb.Mutation(save=pb.SaveRequest(collection="pages", id=i, data=struct({"i": n}))) for n, i in enumerate(ids)
    ]))
    seen, token = [], ""
    while True:
        page = docs.List(pb.ListRequest(collection="pages", page_size=4, page_token=token))
        seen += [d.id for d in page.documents]
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == ids, seen


def batch_and_write():
    got = docs.BatchGet(pb.BatchGetRequest(collection="pages", ids=["p002", "zzz", "p001"]))
    assert [d.id for d in got.documents] == ["p002", "p001"]
    assert list(got.missing_ids) == ["zzz"]
    try:
        docs.Write(pb.WriteRequest(mutations=[
            pb.Mutation(save=pb.SaveRequest(collection="pages", id="new", data=struct({}))),
            pb.Mutation(delete=pb.DeleteRequest(collection="pages", id="missing")),
        ]))
        raise AssertionError("the Write should fail")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND and e.details().startswith("mutation 1:"), e.details()
    expect_code(grpc.StatusCode.NOT_FOUND, lambda: docs.Get(pb.GetRequest(collection="pages", id="new")))
    cols = docs.ListCollections(pb.ListCollectionsRequest())
    assert list(cols.collections) == ["pages", "people"], cols.collections


def error_details():
    """The standard rich error model, decoded as grpcio-status does."""
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2

    def details(fn):
        try:
            fn()
        except grpc.RpcError as e:
            status = rpc_status.from_call(e)
            assert status is not None, "no grpc-status-details-bin"
            found = {}
            for any_ in status.details:
                for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                             error_details_pb2.RetryInfo):
                    if any_.Is(kind.DESCRIPTOR):
                        msg = kind()
                        any_.Unpack(msg)
                        found[kind.__name__] = msg
            return e.code(), found
        raise AssertionError("the call should fail")

    code, found = details(lambda: docs.Get(pb.GetRequest(collection="people", id="nobody")))
    assert code == grpc.StatusCode.NOT_FOUND
    assert found["ErrorInfo"].reason == "DOCUMENT_NOT_FOUND" and found["ErrorInfo"].domain == "docsidecar.dev"
    current = docs.Get(pb.GetRequest(collection="people", id="ada")).rev
    code, found = details(lambda: docs.Save(
        pb.SaveRequest(collection="people", id="ada", data=struct({}), expected_rev="stale")))
    assert code == grpc.StatusCode.ABORTED
    assert found["ErrorInfo"].reason == "REV_MISMATCH"
    assert found["ErrorInfo"].metadata["current_rev"] == current, found["ErrorInfo"]
    mutations = [pb.Mutation(save=pb.SaveRequest(collection="people", id=f"w{i}", data=struct({})))
                 for i in range(3)]
    mutations.append(pb.Mutation(save=pb.SaveRequest(collection="people", id="w3")))
    code, found = details(lambda: docs.Write(pb.WriteRequest(mutations=mutations)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert found["BadRequest"].field_violations[0].field == "mutations[3].save.data", found["BadRequest"]


def paginated_query():
    for n in range(12):
        docs.Save(pb.SaveRequest(collection="orders", id=f"o{n:02d}",
                                 data=struct({"status": "open" if n % 3 else "closed", "total": n})))
    from google.protobuf.struct_pb2 import Value
    request = pb.QueryRequest(
        collection="orders",
        filters=[pb.Filter(field="status", op=pb.Filter.OPERATOR_EQUAL, value=Value(string_value="open"))],
    )
    request.order_by.append(pb.Order(field="total", direction=pb.Order.DIRECTION_DESCENDING))
    request.page_size = 3
    seen = []
    while True:
        page = docs.Query(request)
        seen += [int(d.data["total"]) for d in page.documents]
        assert page.resume_token, "a query page carries a resume token"
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert seen == [11, 10, 8, 7, 5, 4, 2, 1], seen
    count = docs.Count(pb.CountRequest(collection="orders", filters=request.filters))
    assert count.count == 8, count


def health():
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ["", "docsidecar.v1.DocumentService"]:
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, (service, resp)


def reflection():
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert "docsidecar.v1.DocumentService" in services, services
    assert db.FindFileContainingSymbol("docsidecar.v1.DocumentService").name.endswith("document_service.proto")


for name, fn in [("round trip", round_trip), ("generated id", generated_id), ("status codes", statuses),
                 ("pagination", pagination), ("batch get and atomic write", batch_and_write),
                 ("error details", error_details), ("paginated query", paginated_query),
                 ("health", health), ("reflection", reflection)]:
    check(name, fn)

proc.terminate()
code = proc.wait(timeout=30)
check("SIGTERM exits 0", lambda: (_ for _ in ()).throw(AssertionError(code)) if code != 0 else None)
print(f"interop: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
