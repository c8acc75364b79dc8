#!/usr/bin/python3
"""zmctl: a small command-line client for ziti-management (grpcio).

  /usr/bin/python3 test/zmctl.py [--addr 127.0.0.1:50051] COMMAND [ARGS]

  health
  request-service-identity gateway|orchestrator|runner|NUMBER [--out FILE]
  extend ZITI_ID
  resolve ZITI_ID
  create-agent AGENT_UUID
  delete ZITI_ID
  list [agent|runner|channel] [--page-size N]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "integ"))
import grpc  # noqa: E402

import zmtest  # noqa: E402
from zmtest import pb  # noqa: E402

TYPES = {"gateway": 1, "orchestrator": 2, "runner": 3}
ITYPES = {"agent": 1, "runner": 2, "channel": 3}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", default=os.environ.get("GRPC_ADDRESS", "127.0.0.1:50051"))
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("cmd")
    ap.add_argument("arg", nargs="?")
    ap.add_argument("--out")
    ap.add_argument("--page-size", type=int, default=0)
    a = ap.parse_args()
    addr = a.addr if not a.addr.startswith(":") else "127.0.0.1" + a.addr
    with grpc.insecure_channel(addr) as ch:
        st = zmtest.pb_grpc.ZitiManagementServiceStub(ch)
        try:
            if a.cmd == "health":
                r = zmtest.HealthStub(ch).Check(zmtest.health_pb2.HealthCheckRequest(), timeout=a.timeout)
                print(zmtest.health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
            elif a.cmd == "request-service-identity":
                t = TYPES.get(a.arg) or int(a.arg)
                r = st.RequestServiceIdentity(pb.RequestServiceIdentityRequest(service_type=t), timeout=a.timeout)
                print("ziti_identity_id:", r.ziti_identity_id, file=sys.stderr)
                if a.out:
                    with open(a.out, "wb") as f:
                        f.write(r.identity_json)
                    print("identity JSON written to", a.out, file=sys.stderr)
                else:
                    sys.stdout.write(r.identity_json.decode() + "\n")
            elif a.cmd == "extend":
                st.ExtendIdentityLease(pb.ExtendIdentityLeaseRequest(ziti_identity_id=a.arg), timeout=a.timeout)
                print("ok")
            elif a.cmd == "resolve":
                print(st.ResolveIdentity(pb.ResolveIdentityRequest(ziti_identity_id=a.arg), timeout=a.timeout))
            elif a.cmd == "create-agent":
                print(st.CreateAgentIdentity(pb.CreateAgentIdentityRequest(agent_id=a.arg), timeout=a.timeout))
            elif a.cmd == "delete":
                st.DeleteIdentity(pb.DeleteIdentityRequest(ziti_identity_id=a.arg), timeout=a.timeout)
                print("ok")
            elif a.cmd == "list":
                r = st.ListManagedIdentities(pb.ListManagedIdentitiesRequest(
                    identity_type=ITYPES.get(a.arg or "", 0), page_size=a.page_size), timeout=a.timeout)
                print(r)
            else:
                ap.error("unknown command " + a.cmd)
        except grpc.RpcError as e:
            print("error: %s: %s" % (e.code().name, e.details()), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
