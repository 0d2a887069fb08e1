"""A real S3-compatible server on 127.0.0.1 for the corpus tests: moto's standalone server (``moto[server]``, in
the ``corpus-test`` extra), on a free port, with two buckets. Not a cloud: it proves the S3 protocol as pyarrow
speaks it (listing, ranged reads, multipart uploads, copies), not a provider's consistency or permissions."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# Credentials for the test server (it accepts any); distinctive, so a test can prove they are never written.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "st-npu-test-key-id", "AWS_SECRET_ACCESS_KEY": "st-npu-test-secret-0xC0FFEE",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
BUCKETS = ("corpus", "vectors")


@dataclass(frozen=True)
class S3:
    endpoint: str  # host:port

    @property
    def options(self) -> dict[str, str]:
        """The storage options of embed_corpus that reach this server."""
        return {"endpoint_override": self.endpoint, "scheme": "http"}

    def filesystem(self):
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(endpoint_override=self.endpoint, scheme="http",
                            access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                            allow_bucket_creation=True)

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``bucket/prefix``, by its key relative to the prefix."""
        from pyarrow.fs import FileSelector, FileType

        filesystem = self.filesystem()
        found = filesystem.get_file_info(FileSelector(prefix, recursive=True, allow_not_found=True))
        result = {}
        for entry in found:
            if entry.type == FileType.File:
                with filesystem.open_input_stream(entry.path) as handle:
                    result[entry.path.removeprefix(prefix.rstrip("/") + "/")] = handle.read()
        return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """The server, with buckets ``corpus`` and ``vectors``, and the credential variables set in this process."""
    server_module = pytest.importorskip("moto.server", reason='the S3 tests need moto: pip install "st-npu[corpus-test]"')
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    variables = pytest.MonkeyPatch()
    for name, value in CREDENTIALS.items():
        variables.setenv(name, value)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        store = S3(f"{host}:{port}")
        for bucket in BUCKETS:
            store.filesystem().create_dir(bucket)
        yield store
    finally:
        server.stop()
        variables.undo()
