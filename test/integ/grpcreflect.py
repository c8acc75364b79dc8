"""A small grpcurl: list, describe and call a server through gRPC server
reflection, with grpcio and the reflection protocol stubs generated here from
proto/grpc/reflection/v1/reflection.proto (Debian's python3-grpcio ships no
grpc_reflection; grpcurl is not packaged).

  /usr/bin/python3 test/integ/grpcreflect.py HOST:PORT list
  /usr/bin/python3 test/integ/grpcreflect.py HOST:PORT describe SYMBOL
  /usr/bin/python3 test/integ/grpcreflect.py HOST:PORT call SVC/METHOD '{json}'
"""

import importlib.util
import json
import os
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))


def _load(version):
    out = os.path.join(os.environ.get("ZM_BUILD_DIR") or os.path.join(REPO, "build"), "pyreflect", version)
    path = os.path.join(out, "grpc", "reflection", version, "reflection_pb2.py")
    src = os.path.join(REPO, "proto", "grpc", "reflection", version, "reflection.proto")
    if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(src):
        os.makedirs(out, exist_ok=True)
        from grpc_tools import protoc

        if protoc.main(["protoc", "-I", os.path.join(REPO, "proto"), "--python_out=" + out,
                        "grpc/reflection/%s/reflection.proto" % version]) != 0:
            raise RuntimeError("protoc failed")
    # loaded under a private name: a grpc/ package would shadow grpcio
    spec = importlib.util.spec_from_file_location("zm_reflection_%s_pb2" % version, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Reflector:
    def __init__(self, channel, version="v1", timeout=10):
        self.pb = _load(version)
        self.ch = channel
        self.timeout = timeout
        self.method = self.ch.stream_stream(
            "/grpc.reflection.%s.ServerReflection/ServerReflectionInfo" % version,
            request_serializer=self.pb.ServerReflectionRequest.SerializeToString,
            response_deserializer=self.pb.ServerReflectionResponse.FromString)
        self.pool = descriptor_pool.DescriptorPool()
        self.files = {}

    def ask(self, *requests):
        """Sends the requests on one stream; returns the responses in order."""
        return list(self.method(iter(requests), timeout=self.timeout))

    def list_services(self):
        (r,) = self.ask(self.pb.ServerReflectionRequest(list_services="*"))
        return [s.name for s in r.list_services_response.service]

    def _add_files(self, resp):
        if resp.WhichOneof("message_response") == "error_response":
            raise KeyError("%d %s" % (resp.error_response.error_code, resp.error_response.error_message))
        protos = []
        for raw in resp.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            protos.append(fd)
            self.files.setdefault(fd.name, fd)
        # dependencies first
        pending = [fd for fd in protos]
        while pending:
            progressed = False
            for fd in list(pending):
                try:
                    self.pool.FindFileByName(fd.name)
                    pending.remove(fd)
                    progressed = True
                    continue
                except KeyError:
                    pass
                if all(self._have(d) for d in fd.dependency):
                    self.pool.Add(fd)
                    pending.remove(fd)
                    progressed = True
            if not progressed:
                raise RuntimeError("unresolvable dependencies: %s" % [f.name for f in pending])
        return protos

    def _have(self, name):
        try:
            self.pool.FindFileByName(name)
            return True
        except KeyError:
            return False

    def file_containing_symbol(self, symbol):
        (r,) = self.ask(self.pb.ServerReflectionRequest(file_containing_symbol=symbol))
        return self._add_files(r)

    def file_by_filename(self, name):
        (r,) = self.ask(self.pb.ServerReflectionRequest(file_by_filename=name))
        return self._add_files(r)

    def service(self, name):
        self.file_containing_symbol(name)
        return self.pool.FindServiceByName(name)

    def describe(self, symbol):
        self.file_containing_symbol(symbol)
        try:
            s = self.pool.FindServiceByName(symbol)
            lines = ["service %s {" % s.name]
            for m in s.methods:
                lines.append("  rpc %s(%s%s) returns (%s%s);" % (
                    m.name, "stream " if getattr(m, "client_streaming", False) else "",
                    m.input_type.full_name, "stream " if getattr(m, "server_streaming", False) else "",
                    m.output_type.full_name))
            lines.append("}")
            return "\n".join(lines)
        except KeyError:
            d = self.pool.FindMessageTypeByName(symbol)
            return "message %s { %s }" % (d.name, "; ".join(
                "%s = %d" % (f.name, f.number) for f in d.fields))

    def call(self, full_method, request_json, timeout=10):
        """full_method: "pkg.Service/Method" or "pkg.Service.Method"."""
        svc, _, meth = full_method.replace("/", ".").rpartition(".")
        m = self.service(svc).methods_by_name[meth]
        factory = message_factory.MessageFactory(self.pool)
        req_cls = factory.GetPrototype(m.input_type)
        resp_cls = factory.GetPrototype(m.output_type)
        req = json_format.Parse(request_json, req_cls())
        fn = self.ch.unary_unary("/%s/%s" % (svc, meth), request_serializer=req_cls.SerializeToString,
                                 response_deserializer=resp_cls.FromString)
        resp = fn(req, timeout=timeout)
        return json.loads(json_format.MessageToJson(resp, preserving_proto_field_name=True))


def main():
    addr, cmd = sys.argv[1], sys.argv[2]
    with grpc.insecure_channel(addr) as ch:
        r = Reflector(ch)
        if cmd == "list":
            print("\n".join(r.list_services()))
        elif cmd == "describe":
            print(r.describe(sys.argv[3]))
        elif cmd == "call":
            print(json.dumps(r.call(sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "{}"), indent=2))


if __name__ == "__main__":
    main()
