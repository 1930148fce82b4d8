"""Smoke test of the contract from another language.

Generates Python stubs from proto/ with grpcio-tools, starts the built server
on a free port with a fresh SQLite file and an HS256 secret, mints tokens
with PyJWT (not the service's own helper), then creates, reads and looks up a
user, checks an error's code and details, that calls without a token or for
another project are refused, imports and exports, adds the user to a group and
finds it there (member list and `groups:` filter), reads the change log
(ListEvents, WatchEvents), and lists the services through server
reflection (grpcio-reflection speaks v1alpha).

usage: python .ci/smoke.py path/to/user-service
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc
import grpc_tools
import jwt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(out):
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = [
        "users/v1/user.proto",
        "users/v1/user_service.proto",
        "users/v1/group.proto",
        "users/v1/group_service.proto",
        "users/v1/event.proto",
        "users/v1/event_service.proto",
        "google/type/date.proto",
        "google/api/field_behavior.proto",
        "google/rpc/status.proto",
    ]
    rc = protoc.main(
        ["protoc", f"-I{os.path.join(ROOT, 'proto')}", f"-I{well_known}",
         f"--python_out={out}", f"--grpc_python_out={out}"] + files
    )
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    sys.path.insert(0, out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    binary = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="user-service-smoke-")
    os.makedirs(os.path.join(work, "gen"))
    generate(os.path.join(work, "gen"))

    from users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
    from users.v1 import group_pb2, group_service_pb2, group_service_pb2_grpc
    from users.v1 import event_pb2, event_service_pb2, event_service_pb2_grpc

    port = free_port()
    addr = f"127.0.0.1:{port}"
    secret = os.urandom(32).hex()
    secret_file = os.path.join(work, "jwt-secret")
    with open(secret_file, "w") as f:
        f.write(secret + "\n")
    env = dict(os.environ, USER_SERVICE_LISTEN=addr, RUST_LOG="warn",
               USER_SERVICE_AUTH_JWT_SECRET_FILE=secret_file)
    env.pop("DATABASE_URL", None)
    server = subprocess.Popen([binary], cwd=work, env=env)

    def token(projects, scope, sub="python-smoke"):
        now = int(time.time())
        return jwt.encode({"sub": sub, "iat": now, "exp": now + 600,
                           "projects": projects, "scope": scope}, secret, algorithm="HS256")

    class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamStreamClientInterceptor):
        def __init__(self, tok):
            self.md = ("authorization", f"Bearer {tok}")

        def _add(self, details):
            md = list(details.metadata or []) + [self.md]
            return details._replace(metadata=md)

        def intercept_unary_unary(self, cont, details, req):
            return cont(self._add(details), req)

        def intercept_unary_stream(self, cont, details, req):
            return cont(self._add(details), req)

        def intercept_stream_stream(self, cont, details, reqs):
            return cont(self._add(details), reqs)

    try:
        raw = grpc.insecure_channel(addr)
        grpc.channel_ready_future(raw).result(timeout=30)
        channel = grpc.intercept_channel(
            raw, Bearer(token(["smoke", "bulk"], "users.read users.write users.admin")))
        stub = user_service_pb2_grpc.UserServiceStub(channel)

        try:
            user_service_pb2_grpc.UserServiceStub(raw).GetUser(
                user_service_pb2.GetUserRequest(name="projects/smoke/users/x"))
            sys.exit("a call without a token was served")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        try:
            stub.GetUser(user_service_pb2.GetUserRequest(name="projects/other/users/x"))
            sys.exit("a call for a project the token does not grant was served")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e
        reader = user_service_pb2_grpc.UserServiceStub(
            grpc.intercept_channel(raw, Bearer(token("*", "users.read"))))
        try:
            reader.CreateUser(user_service_pb2.CreateUserRequest(
                parent="projects/smoke", user=user_pb2.User(email="r@example.org")))
            sys.exit("a read-only token created a user")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e
        deadline = time.time() + 30
        while True:
            try:
                created = stub.CreateUser(user_service_pb2.CreateUserRequest(
                    parent="projects/smoke",
                    user=user_pb2.User(
                        email="Py.Thon@Example.ORG",
                        phone_number="+1 (212) 555-0100",
                        display_name="From Python",
                        tags=["py", "py", "smoke"],
                        metadata={"lang": "python"},
                    ),
                ))
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.time() > deadline:
                    raise
                time.sleep(0.1)
        assert created.name.startswith("projects/smoke/users/"), created.name
        assert created.email == "Py.Thon@example.org", created.email
        assert created.phone_number == "+12125550100", created.phone_number
        assert list(created.tags) == ["py", "smoke"], created.tags
        assert created.state == user_pb2.User.ACTIVE

        got = stub.GetUser(user_service_pb2.GetUserRequest(name=created.name))
        assert got == created, (got, created)
        found = stub.LookupUser(user_service_pb2.LookupUserRequest(
            parent="projects/smoke", email="py.thon@example.org"))
        assert found.name == created.name

        try:
            stub.CreateUser(user_service_pb2.CreateUserRequest(
                parent="projects/smoke", user=user_pb2.User(email="nope")))
            sys.exit("an invalid email was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            trailers = dict(e.trailing_metadata() or ())
            assert "grpc-status-details-bin" in trailers, trailers

        # Bulk: a client-streaming import answered per chunk, then an export.
        def batches():
            yield user_service_pb2.ImportUsersRequest(
                parent="projects/bulk",
                users=[user_pb2.User(email=f"p{i}@example.org") for i in range(3)])
            yield user_service_pb2.ImportUsersRequest(
                users=[user_pb2.User(email="bad"), user_pb2.User(email="p0@EXAMPLE.org")])
        acks = list(stub.ImportUsers(batches()))
        assert acks[-1].committed_through == 4, acks
        assert sum(a.created_count for a in acks) == 3, acks
        failed = [(f.index, f.status.code) for a in acks for f in a.failures]
        assert failed == [(3, 3), (4, 6)], failed  # INVALID_ARGUMENT, ALREADY_EXISTS
        exported = [u.email for m in stub.StreamUsers(user_service_pb2.StreamUsersRequest(
            parent="projects/bulk", order_by="email")) for u in m.users]
        assert exported == ["p0@example.org", "p1@example.org", "p2@example.org"], exported

        # Groups: a group with the created user as a member, listed back, and
        # the user found through the group in a user filter.
        groups = group_service_pb2_grpc.GroupServiceStub(channel)
        team = groups.CreateGroup(group_service_pb2.CreateGroupRequest(
            parent="projects/smoke", group_id="team",
            group=group_pb2.Group(display_name="Team")))
        assert team.name == "projects/smoke/groups/team", team.name
        groups.AddGroupMembers(group_service_pb2.AddGroupMembersRequest(
            group=team.name, members=[created.name]))
        listed = groups.ListGroupMembers(group_service_pb2.ListGroupMembersRequest(
            group=team.name))
        assert [(m.name, m.kind) for m in listed.members] == [
            (created.name, group_pb2.GroupMember.USER)], listed
        in_team = stub.ListUsers(user_service_pb2.ListUsersRequest(
            parent="projects/smoke", filter='groups:"team"'))
        assert [u.name for u in in_team.users] == [created.name], in_team
        try:
            groups.AddGroupMembers(group_service_pb2.AddGroupMembersRequest(
                group=team.name, members=["projects/smoke/users/nobody"]))
            sys.exit("an unknown member was added")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e

        # Change events: the log of the project, in revision order, naming
        # the token's subject; a watcher replays it and reports the head.
        events = event_service_pb2_grpc.EventServiceStub(channel)
        log = events.ListEvents(event_service_pb2.ListEventsRequest(
            parent="projects/smoke", page_size=1000))
        revisions = [e.revision for e in log.events]
        assert revisions == list(range(1, len(revisions) + 1)), revisions
        assert log.head_revision == len(revisions), log.head_revision
        kinds = [e.type for e in log.events]
        for want in (event_pb2.Event.USER_CREATED, event_pb2.Event.GROUP_CREATED,
                     event_pb2.Event.GROUP_MEMBERS_ADDED):
            assert want in kinds, kinds
        assert all(e.actor == "python-smoke" for e in log.events), log.events
        added = [e for e in log.events if e.type == event_pb2.Event.GROUP_MEMBERS_ADDED]
        assert [m.name for m in added[0].members] == [created.name], added
        for message in events.WatchEvents(event_service_pb2.WatchEventsRequest(
                parent="projects/smoke", after_revision=len(revisions) - 1)):
            if message.head_revision == len(revisions):
                break

        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )
        services = set(ProtoReflectionDescriptorDatabase(raw).get_services())
        for want in ("users.v1.UserService", "users.v1.GroupService",
                     "users.v1.EventService", "grpc.health.v1.Health"):
            assert want in services, services
        print("python smoke test: OK")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
