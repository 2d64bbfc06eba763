"""Stand-ins for the Triton server, for the client's key and TLS tests: in-process gRPC and HTTP servers that
speak just enough of the KServe v2 protocol for ``CaptionClient.caption`` and ``health``, require the inference
key the way Triton 2.51's restricted APIs do (same header names, same answers), optionally over TLS, and record
the headers of every inference. Also a throwaway CA with server and client certificates."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import ssl
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

CAPTION, SCORE = "a cat", -0.5
GRPC_HEADER = "triton-grpc-protocol-ofa-api-key"
HTTP_HEADER = "ofa-api-key"


# -- certificates ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate it signed (localhost, 127.0.0.1), a client certificate it signed,
    and a second CA that signed nothing here (a client trusting it must refuse the server)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256())


def make_certificates(folder: Path) -> Certificates:
    """A CA, a server and a client certificate signed by it, and an unrelated CA, as PEM files in ``folder``."""
    ca_key, other_key, server_key, client_key = _key(), _key(), _key(), _key()
    ca = _certificate("test CA", ca_key, None, ca=True)
    other = _certificate("other CA", other_key, None, ca=True)
    server = _certificate("localhost", server_key, (ca, ca_key), server=True)
    client = _certificate("caption client", client_key, (ca, ca_key))
    return Certificates(
        ca=_write_cert(ca, folder / "ca.pem"),
        server_cert=_write_cert(server, folder / "server.pem"),
        server_key=_write_key(server_key, folder / "server.key"),
        client_cert=_write_cert(client, folder / "client.pem"),
        client_key=_write_key(client_key, folder / "client.key"),
        other_ca=_write_cert(other, folder / "other-ca.pem"),
    )


# -- gRPC --------------------------------------------------------------------------------------------------


class _Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, owner: FakeGrpcServer) -> None:
        self.owner = owner

    def ServerLive(self, request, context):  # noqa: N802 - the service's method names
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):  # noqa: N802
        return service_pb2.ModelReadyResponse(ready=True)

    def ModelInfer(self, request, context):  # noqa: N802
        metadata = dict(context.invocation_metadata())
        self.owner.infer_metadata.append(metadata)
        if self.owner.api_key is not None and metadata.get(GRPC_HEADER) != self.owner.api_key:
            # What Triton 2.51 answers for a restricted protocol without the right header.
            context.abort(
                grpc.StatusCode.UNAVAILABLE, f"This protocol is restricted, expecting header '{GRPC_HEADER}'"
            )
        if self.owner.error is not None:
            context.abort(*self.owner.error)
        response = service_pb2.ModelInferResponse(model_name=request.model_name)
        caption = response.outputs.add(name="caption", datatype="BYTES")
        caption.shape.extend([1, 1])
        score = response.outputs.add(name="score", datatype="FP32")
        score.shape.extend([1, 1])
        response.raw_output_contents.append(
            serialize_byte_tensor(np.array([CAPTION.encode()], dtype=np.object_)).item()
        )
        response.raw_output_contents.append(np.array([SCORE], np.float32).tobytes())
        return response


class FakeGrpcServer:
    """gRPC stand-in on 127.0.0.1; ``api_key`` restricts inference, ``certificates`` turn TLS on (``mutual``:
    the client must present a certificate signed by the CA); ``error`` = (StatusCode, message) fails inference."""

    def __init__(
        self,
        api_key: str | None = None,
        certificates: Certificates | None = None,
        *,
        mutual: bool = False,
        error: tuple[grpc.StatusCode, str] | None = None,
    ) -> None:
        self.api_key = api_key
        self.error = error
        self.infer_metadata: list[dict[str, str]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Service(self), self.server)
        if certificates is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials(
                [(certificates.server_key.read_bytes(), certificates.server_cert.read_bytes())],
                root_certificates=certificates.ca.read_bytes() if mutual else None,
                require_client_auth=mutual,
            )
            port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def close(self) -> None:
        self.server.stop(grace=None)


# -- HTTP --------------------------------------------------------------------------------------------------


#: The JSON body of Triton's HTTP answer to a ``caption`` inference: CAPTION with SCORE.
CAPTION_ANSWER = {
    "model_name": "caption",
    "outputs": [
        {"name": "caption", "datatype": "BYTES", "shape": [1, 1], "data": [CAPTION]},
        {"name": "score", "datatype": "FP32", "shape": [1, 1], "data": [SCORE]},
    ],
}


def reply_json(handler: http.server.BaseHTTPRequestHandler, status: int, payload: dict) -> None:
    """Answer the request ``handler`` serves with ``status`` and ``payload`` as JSON."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class FakeHttpServer:
    """HTTP stand-in on 127.0.0.1 (HTTPS with ``certificates``); ``api_key`` restricts inference as Triton's
    ``--http-restricted-api`` does (403 with its message); records the headers of every inference."""

    def __init__(self, api_key: str | None = None, certificates: Certificates | None = None) -> None:
        self.api_key = api_key
        self.infer_headers: list[dict[str, str]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                reply_json(self, 200, {})  # health: live, ready, model ready

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                owner.infer_headers.append(headers)
                if owner.api_key is not None and headers.get(HTTP_HEADER) != owner.api_key:
                    reply_json(
                        self, 403, {"error": f"This API is restricted, expecting header '{HTTP_HEADER}'"}
                    )
                    return
                reply_json(self, 200, CAPTION_ANSWER)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if certificates is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificates.server_cert, certificates.server_key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
