"""The store's logic: functions, versions, groups and instances, and the events each change emits.

Pure of sockets: every public method takes plain arguments, changes the database
in one transaction, and returns a result plus the events to publish, so unit tests
call it directly. Lifecycle of a deployment (one fusion group):

    function.put   -> group.version += 1, members[name] = new version, state deploying
    instance.ready -> first READY of the group's version promotes it: ready_version,
                      function.version (the serving version) and state ready
    deploy.failed  -> the new version is marked failed; the group falls back to its
                      ready version (still running), or is failed when it had none

A regroup (groups.set: PUT /groups, the optimizer) is staged, so that a failed one
keeps the setup in force the way a failed deploy keeps the serving version:

    groups.set     -> a regroup row, and a proposed group (groups.regroup = its id) for
                      each group of the new setup not in force yet, the rests of the
                      groups its tasks leave included; functions keep their groups
    instance.ready -> once every proposed group of the regroup serves, it is put in
                      force: its tasks move in, the groups they left go (state done)
    deploy.failed  -> of a proposed group: the regroup's groups go, nothing in force
                      changes, and the regroup is failed naming the task(s) that failed
    groups.set again -> superseded; a task of it redeployed or deleted -> cancelled

Longer than ~400 lines: one state machine over one transaction per change; split, its
parts would pass the database and the record builders back and forth.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

from shared.errors import Conflict, InvalidRequest, NotFound, NuclideError
from shared.fusion import merge_specs, scale_bounds, validate_setup
from shared.gateways import GATEWAY_TTL_S
from shared.names import validate_function_name
from shared.runtimes import FIELDS as RUNTIME_FIELDS, parse_runtime
from shared.spec import upgrade_stored
from services.store.blobs import Blobs, BlobStore  # noqa: F401 (BlobStore: re-exported)
from services.store.db import SqlDatabase

Change = tuple[str, dict[str, Any]]

INSTANCE_HISTORY = 20  # exited instance rows kept per group, for logs and diagnosis
REGROUP_HISTORY = 20  # finished regroups kept, for GET /groups and the optimizer
REPLICAS_OVERRIDES_KEY = "replicas.overrides"  # kv: {function: replicas} held by PUT /functions/{name}/replicas


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


class StoreState:
    def __init__(self, db: SqlDatabase, blobs: Blobs) -> None:
        self.db = db
        self.blobs = blobs
        self.deployer_seen_at = 0.0

    # ----- sequence numbers -------------------------------------------------

    def seq(self) -> int:
        row = self.db.one("SELECT value FROM meta WHERE key='seq'")
        return int(row[0]) if row else 0

    def next_group_version(self) -> int:
        """A new group version from the one global counter (inside the caller's transaction)."""
        current = int(self.db.one("SELECT value FROM meta WHERE key='group_seq'")[0]) + 1
        self.db.execute("UPDATE meta SET value=? WHERE key='group_seq'", (str(current),))
        return current

    def next_seqs(self, count: int) -> int:
        """Reserve ``count`` sequence numbers inside the caller's transaction; return the first."""
        current = self.seq()
        self.db.execute("UPDATE meta SET value=? WHERE key='seq'", (str(current + count),))
        return current + 1

    # ----- records ----------------------------------------------------------

    def _group_row(self, group_id: str) -> Any:
        return self.db.one("SELECT * FROM groups WHERE id=?", (group_id,))

    def group_record(self, row: Any) -> dict[str, Any]:
        ready = self.db.one(
            "SELECT COUNT(*) FROM instances WHERE group_id=? AND group_version=? AND state='ready'",
            (row["id"], row["ready_version"]),
        )[0]
        members = json.loads(row["members"])
        return {
            "id": row["id"],
            "tasks": sorted(members),
            "members": members,
            "version": row["version"],
            "ready_version": row["ready_version"],
            "ready_members": json.loads(row["ready_members"]),
            "state": row["state"],
            "replicas_desired": row["replicas_desired"],
            "replicas_ready": ready,
            "error": row["error"],
            "regroup": row["regroup"],  # the regroup that proposed it, None once in force
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
        }

    def function_record(self, row: Any) -> dict[str, Any]:
        shown = row["version"] or row["latest_version"]
        ver = self.db.one("SELECT * FROM function_versions WHERE name=? AND version=?", (row["name"], shown))
        spec = upgrade_stored(json.loads(ver["spec"])) if ver else {}
        group = self._group_row(row["group_id"])
        grec = self.group_record(group) if group else None
        latest = ver if shown == row["latest_version"] else self.db.one(
            "SELECT state, error FROM function_versions WHERE name=? AND version=?", (row["name"], row["latest_version"]))
        return {
            "name": row["name"],
            "id": row["name"],
            "version": row["version"],
            "latest_version": row["latest_version"],
            "latest_version_state": latest["state"] if latest else None,
            "state": row["state"],
            "runtime": spec.get("runtime"),
            "handler": spec.get("handler"),
            "description": spec.get("description", ""),
            "private": bool(spec.get("private", False)),
            "timeout_s": spec.get("timeout_s", 30.0),
            "group": {
                "id": row["group_id"],
                "version": grec["ready_version"] if grec else 0,
                "tasks": sorted(grec["members"]) if grec else [row["name"]],
            },
            "replicas": {
                "desired": grec["replicas_desired"] if grec else 0,
                "ready": grec["replicas_ready"] if grec else 0,
            },
            "scaling": {
                "min_replicas": int(spec.get("min_replicas", 1)),
                "max_replicas": int(spec.get("max_replicas") or max(int(spec.get("min_replicas", 1)), 1)),
                "target_concurrency": int(spec.get("target_concurrency") or spec.get("max_concurrency") or 1),
                "override": self.replicas_overrides().get(row["name"]),  # PUT /functions/{name}/replicas
            },
            "warnings": json.loads(ver["warnings"]) if ver else [],
            "last_error": row["last_error"],
            "created_at": _iso(row["created_at"]),
            "updated_at": _iso(row["updated_at"]),
            "spec": spec,
        }

    def instance_record(self, row: Any) -> dict[str, Any]:
        return {k: row[k] for k in row.keys()}

    def _function_row(self, name: str) -> Any:
        row = self.db.one("SELECT * FROM functions WHERE name=?", (name,))
        if row is None:
            raise NotFound(f"function '{name}' not found")
        return row

    # ----- queries ------------------------------------------------------------

    def get_function(self, name: str) -> dict[str, Any]:
        return self.function_record(self._function_row(name))

    def list_functions(self) -> list[dict[str, Any]]:
        return [self.function_record(r) for r in self.db.all("SELECT * FROM functions ORDER BY name")]

    def get_version(self, name: str, version: int) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM function_versions WHERE name=? AND version=?", (name, version))
        if row is None:
            raise NotFound(f"function '{name}' has no version {version}")
        return {"name": name, "version": version, "digest": row["digest"], "spec": upgrade_stored(json.loads(row["spec"])), "state": row["state"]}

    def snapshot(self) -> dict[str, Any]:
        return {
            "seq": self.seq(),
            "functions": self.list_functions(),
            "groups": [self.group_record(r) for r in self.db.all("SELECT * FROM groups ORDER BY id")],
            "instances": [self.instance_record(r) for r in self.db.all("SELECT * FROM instances WHERE state!='exited'")],
            "runtimes": self.list_runtimes(),
            "gateways": self.live_gateways(GATEWAY_TTL_S),
        }

    # ----- changes ------------------------------------------------------------

    def _sequenced(self, payloads: list[Change]) -> list[Change]:
        """Number the events to publish (inside the caller's transaction)."""
        if payloads:
            first = self.next_seqs(len(payloads))
            for i, (_, data) in enumerate(payloads):
                data["seq"] = first + i
        return payloads

    def _promote(self, members: dict[str, int], now: float) -> list[str]:
        """Make the members' versions the serving ones (their group serves them now); returns the names."""
        for name, version in members.items():
            self.db.execute("UPDATE functions SET version=?, state='ready', last_error=NULL, updated_at=? WHERE name=?",
                            (version, now, name))
            self.db.execute("UPDATE function_versions SET state='ready' WHERE name=? AND version=?", (name, version))
            self.db.execute("UPDATE function_versions SET state='superseded' WHERE name=? AND version<? AND"
                            " state='ready'", (name, version))
        return list(members)

    def put_function(self, name: str, spec: dict[str, Any], warnings: list[str], zip_bytes: bytes) -> tuple[dict[str, Any], list[Change]]:
        validate_function_name(name)
        if not zip_bytes:
            raise InvalidRequest("function.put needs the zip as its body")
        if spec.get("registered_runtime") and self.db.one("SELECT 1 FROM runtimes WHERE name=?", (spec.get("runtime"),)) is None:
            raise InvalidRequest(f"runtime '{spec.get('runtime')}' is not registered (any more); register it with"
                                 " PUT /runtimes/{name} and deploy again")
        digest = self.blobs.put(zip_bytes)
        now = time.time()
        replicas = max(int(spec.get("min_replicas", 1) or 0), 1)
        with self.db.tx():
            self.db.execute("INSERT INTO blobs (digest, size, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                            (digest, len(zip_bytes), now))
            row = self.db.one("SELECT * FROM functions WHERE name=?", (name,))
            if row is None:
                version, group_id = 1, f"g-{name}"
                self.db.execute(
                    "INSERT INTO functions (name, version, latest_version, state, group_id, last_error, created_at, updated_at)"
                    " VALUES (?, 0, 1, 'deploying', ?, NULL, ?, ?)",
                    (name, group_id, now, now),
                )
            else:
                version, group_id = row["latest_version"] + 1, row["group_id"]
                self.db.execute(
                    "UPDATE functions SET latest_version=?, state='deploying', updated_at=? WHERE name=?", (version, now, name)
                )
            self.db.execute(
                "INSERT INTO function_versions (name, version, digest, spec, warnings, state, error, created_at)"
                " VALUES (?, ?, ?, ?, ?, 'pending', NULL, ?)",
                (name, version, digest, json.dumps(spec, sort_keys=True), json.dumps(warnings), now),
            )
            group = self._group_row(group_id)
            group_version = self.next_group_version()
            if group is None:
                self.db.execute(
                    "INSERT INTO groups (id, members, version, version_counter, ready_version, ready_members, state,"
                    " replicas_desired, error, created_at, updated_at) VALUES (?, ?, ?, ?, 0, '{}', 'deploying', ?, NULL, ?, ?)",
                    (group_id, json.dumps({name: version}), group_version, group_version, replicas, now, now),
                )
            else:
                members = json.loads(group["members"])
                members[name] = version
                self.db.execute(
                    "UPDATE groups SET members=?, version=?, version_counter=?, state='deploying', replicas_desired=?,"
                    " updated_at=? WHERE id=?",
                    (json.dumps(members), group_version, group_version,
                     self._redeploy_replicas(group, members, {name: spec}), now, group_id),
                )
            events: list[Change] = [("function.changed", {"function": self.get_function(name)}),
                                   ("group.changed", {"group": self.group_record(self._group_row(group_id))})]
            # a regroup under way was built from the version this one replaces: it would put that back
            for regroup_id in dict.fromkeys(r["regroup"] for r in self._proposed_with(name)):
                events += self._end_regroup(regroup_id, "cancelled", f"task '{name}' was redeployed meanwhile;"
                                            " request the setup again", [], "", now)
            self._sequenced(events)
        fn = events[0][1]["function"]
        return {"function": fn, "version": version, "group_id": group_id, "group_version": group_version}, events

    # ----- registered runtimes -------------------------------------------------------

    @staticmethod
    def runtime_record(row: Any) -> dict[str, Any]:
        return {"name": row["name"], "image": row["image"], "image_id": row["image_id"], "path": row["path"],
                "dependencies": json.loads(row["dependencies"]), "run": json.loads(row["run"]),
                "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"])}

    def list_runtimes(self) -> list[dict[str, Any]]:
        return [self.runtime_record(r) for r in self.db.all("SELECT * FROM runtimes ORDER BY name")]

    def get_runtime(self, name: str) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM runtimes WHERE name=?", (name,))
        if row is None:
            known = ", ".join(r["name"] for r in self.db.all("SELECT name FROM runtimes ORDER BY name")) or "none"
            raise NotFound(f"runtime '{name}' not found (registered: {known})")
        return self.runtime_record(row)

    def put_runtime(self, definition: dict[str, Any], image_id: str) -> tuple[dict[str, Any], list[Change]]:
        """Register or replace a runtime; functions deployed before keep the definition they were built with."""
        rt = parse_runtime(definition.get("name"), {k: definition.get(k) for k in RUNTIME_FIELDS})
        now = time.time()
        with self.db.tx():
            created = self.db.one("SELECT 1 FROM runtimes WHERE name=?", (rt["name"],)) is None
            self.db.execute(
                "INSERT INTO runtimes (name, image, image_id, path, dependencies, run, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET image=excluded.image,"
                " image_id=excluded.image_id, path=excluded.path, dependencies=excluded.dependencies,"
                " run=excluded.run, updated_at=excluded.updated_at",
                (rt["name"], rt["image"], str(image_id), rt["path"], json.dumps(rt["dependencies"]),
                 json.dumps(rt["run"]), now, now))
            rec = self.get_runtime(rt["name"])
            seq = self.next_seqs(1)
        return {**rec, "created": created}, [("runtime.changed", {"seq": seq, "runtime": rec})]

    def runtime_users(self, name: str) -> list[str]:
        """Functions whose serving or latest version runs on the runtime ``name``."""
        rows = self.db.all("SELECT f.name AS name, v.spec AS spec FROM functions f JOIN function_versions v"
                           " ON v.name=f.name AND v.version IN (f.version, f.latest_version)")
        return sorted({r["name"] for r in rows if upgrade_stored(json.loads(r["spec"])).get("runtime") == name})

    def delete_runtime(self, name: str) -> tuple[dict[str, Any], list[Change]]:
        with self.db.tx():
            self.get_runtime(name)
            users = self.runtime_users(name)
            if users:
                raise Conflict(f"runtime '{name}' is used by {', '.join(repr(u) for u in users)}; delete or redeploy"
                               " those functions on another runtime first", {"functions": users})
            self.db.execute("DELETE FROM runtimes WHERE name=?", (name,))
            seq = self.next_seqs(1)
        return {"deleted": name}, [("runtime.deleted", {"seq": seq, "name": name})]

    def delete_function(self, name: str) -> tuple[dict[str, Any], list[Change]]:
        now = time.time()
        with self.db.tx():
            row = self._function_row(name)
            group = self._group_row(row["group_id"])
            self.db.execute("DELETE FROM functions WHERE name=?", (name,))
            self.db.execute("DELETE FROM function_versions WHERE name=?", (name,))
            overrides = self.replicas_overrides()
            if overrides.pop(name, None) is not None:
                self._kv_write(REPLICAS_OVERRIDES_KEY, overrides)
            events: list[Change] = [("function.deleted", {"name": name, "group_id": row["group_id"]})]
            if group is not None:
                members = json.loads(group["members"])
                members.pop(name, None)
                if not members:
                    self.db.execute("DELETE FROM groups WHERE id=?", (group["id"],))
                    events.append(("group.deleted", {"group_id": group["id"]}))
                else:
                    ready_members = json.loads(group["ready_members"])
                    ready_members.pop(name, None)
                    counter = self.next_group_version()
                    self.db.execute(
                        "UPDATE groups SET members=?, ready_members=?, version=?, version_counter=?, state='deploying',"
                        " replicas_desired=?, updated_at=? WHERE id=?",
                        (json.dumps(members), json.dumps(ready_members), counter, counter,
                         self._group_replicas(members), now, group["id"]),
                    )
                    events.append(("group.changed", {"group": self.group_record(self._group_row(group["id"]))}))
            for regroup_id in dict.fromkeys(r["regroup"] for r in self._proposed_with(name)):
                events += self._end_regroup(regroup_id, "cancelled", f"task '{name}' was deleted", [], "", now)
            self._sequenced(events)
        return {"deleted": name}, events

    def instance_started(self, instance_id: str, group_id: str, group_version: int, backend: str, pid: int | None) -> list[Change]:
        now = time.time()
        with self.db.tx():
            self.db.execute(
                "INSERT INTO instances (id, group_id, group_version, backend, state, pid, started_at, updated_at)"
                " VALUES (?, ?, ?, ?, 'starting', ?, ?, ?) ON CONFLICT(id) DO UPDATE SET pid=excluded.pid,"
                " updated_at=excluded.updated_at",
                (instance_id, group_id, group_version, backend, pid, now, now),
            )
            rec = self.instance_record(self.db.one("SELECT * FROM instances WHERE id=?", (instance_id,)))
            seq = self.next_seqs(1)
        return [("instance.changed", {"seq": seq, "instance": rec})]

    def instance_ready(self, instance_id: str, group_id: str, group_version: int, functions: dict[str, int]) -> list[Change]:
        now = time.time()
        events: list[Change] = []
        with self.db.tx():
            self.db.execute(
                "INSERT INTO instances (id, group_id, group_version, backend, state, started_at, ready_at, updated_at)"
                " VALUES (?, ?, ?, '', 'ready', ?, ?, ?) ON CONFLICT(id) DO UPDATE SET state='ready',"
                " ready_at=excluded.ready_at, updated_at=excluded.updated_at",
                (instance_id, group_id, group_version, now, now, now),
            )
            group = self._group_row(group_id)
            changed_functions: list[str] = []
            if group is not None and group["version"] == group_version and (
                group["ready_version"] != group_version or group["state"] != "ready"
            ):
                members = json.loads(group["members"])
                self.db.execute(
                    "UPDATE groups SET ready_version=?, ready_members=?, state='ready', error=NULL, updated_at=? WHERE id=?",
                    (group_version, json.dumps(members), now, group_id),
                )
                if group["regroup"] is None:  # a proposed group's tasks move in when its whole regroup serves
                    changed_functions = self._promote(members, now)
            rec = self.instance_record(self.db.one("SELECT * FROM instances WHERE id=?", (instance_id,)))
            events.append(("instance.changed", {"instance": rec}))
            if group is not None:
                events.append(("group.changed", {"group": self.group_record(self._group_row(group_id))}))
            for name in changed_functions:
                events.append(("function.changed", {"function": self.get_function(name)}))
            if group is not None and group["regroup"] is not None:
                events += self._commit_if_ready(group["regroup"], now)
            self._sequenced(events)
        return events

    def instance_exited(self, instance_id: str, exit_code: int | None, error: str | None) -> list[Change]:
        now = time.time()
        with self.db.tx():
            row = self.db.one("SELECT * FROM instances WHERE id=?", (instance_id,))
            if row is None:
                return []
            self.db.execute(
                "UPDATE instances SET state='exited', exit_code=?, error=?, updated_at=? WHERE id=?",
                (exit_code, error, now, instance_id),
            )
            self._trim_history(row["group_id"])
            rec = self.instance_record(self.db.one("SELECT * FROM instances WHERE id=?", (instance_id,)))
            group = self._group_row(row["group_id"])
            payloads: list[Change] = [("instance.changed", {"instance": rec})]
            if group is not None:
                payloads.append(("group.changed", {"group": self.group_record(group)}))
            first = self.next_seqs(len(payloads))
        for i, (_, data) in enumerate(payloads):
            data["seq"] = first + i
        return payloads

    def _trim_history(self, group_id: str) -> None:
        """Keep a short history of exited instances per group; older exited rows go."""
        self.db.execute(
            "DELETE FROM instances WHERE group_id=? AND state='exited' AND id NOT IN (SELECT id FROM instances"
            " WHERE group_id=? AND state='exited' ORDER BY updated_at DESC LIMIT ?)",
            (group_id, group_id, INSTANCE_HISTORY),
        )

    def instances_gone(self, instance_ids: list[str], reason: str) -> tuple[dict[str, Any], list[Change]]:
        """Mark exited the instances the deployer found no process for (it restarted, or was away when they
        died), so they stop counting as ready; rows already exited keep their exit code and error."""
        now = time.time()
        with self.db.tx():
            rows = [r for r in (self.db.one("SELECT * FROM instances WHERE id=?", (str(i),)) for i in instance_ids)
                    if r is not None and r["state"] != "exited"]
            payloads: list[Change] = []
            for row in rows:
                self.db.execute("UPDATE instances SET state='exited', error=?, updated_at=? WHERE id=?",
                                (reason, now, row["id"]))
                rec = self.instance_record(self.db.one("SELECT * FROM instances WHERE id=?", (row["id"],)))
                payloads.append(("instance.changed", {"instance": rec}))
            for group_id in dict.fromkeys(r["group_id"] for r in rows):
                self._trim_history(group_id)
                group = self._group_row(group_id)
                if group is not None:
                    payloads.append(("group.changed", {"group": self.group_record(group)}))
            self._sequenced(payloads)
        return {"exited": [r["id"] for r in rows]}, payloads

    def deploy_failed(self, group_id: str, group_version: int, error: str, log_tail: str,
                      tasks: list[str] | None = None) -> list[Change]:
        """A group version that will not serve; ``tasks`` are the members it failed for, when the deployer knows."""
        now = time.time()
        with self.db.tx():
            group = self._group_row(group_id)
            if group is None or group["version"] != group_version:
                return []
            if group["regroup"] is not None:
                return self._sequenced(self._regroup_failed(group, error, log_tail, tasks or [], now))
            members = json.loads(group["members"])
            ready_members = json.loads(group["ready_members"])
            payloads: list[Change] = []
            names: list[str] = []
            message = error if not log_tail else f"{error}\n{log_tail}"
            if group["ready_version"] == group_version:
                # the serving version itself keeps crashing
                self.db.execute("UPDATE groups SET state='failed', error=?, updated_at=? WHERE id=?", (message, now, group_id))
                for name in members:
                    self.db.execute(
                        "UPDATE functions SET state='failed', last_error=?, updated_at=? WHERE name=?", (message, now, name)
                    )
                    names.append(name)
            else:
                for name, version in members.items():
                    if ready_members.get(name) == version:
                        continue
                    names.append(name)
                    self.db.execute(
                        "UPDATE function_versions SET state='failed', error=? WHERE name=? AND version=?", (message, name, version)
                    )
                    self.db.execute(
                        "UPDATE functions SET state=CASE WHEN version>0 THEN 'ready' ELSE 'failed' END, last_error=?,"
                        " updated_at=? WHERE name=?",
                        (message, now, name),
                    )
                if group["ready_version"] > 0:
                    self.db.execute(
                        "UPDATE groups SET version=ready_version, members=ready_members, state='ready', error=?, updated_at=?"
                        " WHERE id=?",
                        (message, now, group_id),
                    )
                else:
                    self.db.execute("UPDATE groups SET state='failed', error=?, updated_at=? WHERE id=?", (message, now, group_id))
            payloads.append(
                ("deploy.failed", {"group_id": group_id, "group_version": group_version, "error": error,
                                   "log_tail": log_tail, "functions": names})
            )
            payloads.append(("group.changed", {"group": self.group_record(self._group_row(group_id))}))
            for name in names:
                fn = self.db.one("SELECT * FROM functions WHERE name=?", (name,))
                if fn is not None:
                    payloads.append(("function.changed", {"function": self.function_record(fn)}))
            first = self.next_seqs(len(payloads))
        for i, (_, data) in enumerate(payloads):
            data["seq"] = first + i
        return payloads

    def instances_of(self, group_id: str | None = None) -> list[dict[str, Any]]:
        if group_id:
            rows = self.db.all("SELECT * FROM instances WHERE group_id=? ORDER BY started_at", (group_id,))
        else:
            rows = self.db.all("SELECT * FROM instances ORDER BY started_at")
        return [self.instance_record(r) for r in rows]

    # ----- fusion groups ------------------------------------------------------------

    def _member_specs(self, members: dict[str, int], overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        specs: dict[str, dict[str, Any]] = {}
        for name, version in members.items():
            if overrides and name in overrides:
                specs[name] = overrides[name]
                continue
            row = self.db.one("SELECT spec FROM function_versions WHERE name=? AND version=?", (name, version))
            specs[name] = upgrade_stored(json.loads(row["spec"])) if row else {}
        return specs

    def _group_replicas(self, members: dict[str, int], overrides: dict[str, dict[str, Any]] | None = None) -> int:
        return int(merge_specs(self._member_specs(members, overrides))["min_replicas"])

    def group_spec(self, group_id: str) -> dict[str, Any]:
        """The merged settings the deployer builds a group's environment from."""
        row = self._group_row(group_id)
        if row is None:
            raise NotFound(f"group '{group_id}' not found")
        return merge_specs(self._member_specs(json.loads(row["members"])))

    def _group_summary(self, g: dict[str, Any], overrides: dict[str, int]) -> dict[str, Any]:
        try:
            bounds = scale_bounds(self._member_specs(g["members"]))
        except NuclideError:
            bounds = {"max_replicas": None, "target_concurrency": None}
        held = [overrides[n] for n in g["tasks"] if n in overrides]
        return {"id": g["id"], "tasks": g["tasks"], "version": g["version"], "ready_version": g["ready_version"],
                "state": g["state"], "error": g["error"],
                "replicas": {"desired": g["replicas_desired"], "ready": g["replicas_ready"]},
                "scaling": {"min_replicas": self._group_replicas(g["members"]), **bounds,
                            "override": max(held) if held else None}}

    def list_groups(self) -> dict[str, Any]:
        """The setup in force, its groups, and the latest regroup (under way, done, failed, ...)."""
        groups = [self.group_record(r) for r in self.db.all("SELECT * FROM groups WHERE regroup IS NULL ORDER BY id")]
        overrides = self.replicas_overrides()
        latest = self.db.one("SELECT * FROM regroups ORDER BY id DESC LIMIT 1")
        return {
            "setup": [g["tasks"] for g in groups],
            "groups": [self._group_summary(g, overrides) for g in groups],
            "regroup": self.regroup_record(latest) if latest else None,
        }

    def regroup_record(self, row: Any) -> dict[str, Any]:
        proposed = self.db.all("SELECT * FROM groups WHERE regroup=? ORDER BY id", (row["id"],))
        return {
            "id": row["id"],
            "setup": json.loads(row["setup"]),
            "state": row["state"],  # deploying, done, failed, superseded, cancelled
            "error": row["error"],
            "failed_tasks": json.loads(row["failed_tasks"]),
            "log_tail": row["log_tail"] or "",
            "groups": [self._group_summary(self.group_record(r), {}) for r in proposed],  # while deploying
            "created_at": _iso(row["created_at"]),
            "updated_at": _iso(row["updated_at"]),
        }

    def get_regroup(self, regroup_id: int) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM regroups WHERE id=?", (regroup_id,))
        if row is None:
            raise NotFound(f"regroup {regroup_id} not found (only the latest {REGROUP_HISTORY} are kept)")
        return self.regroup_record(row)

    def _proposed_with(self, name: str) -> list[Any]:
        """The proposed groups (of a regroup under way) that have ``name`` as a member."""
        return [r for r in self.db.all("SELECT * FROM groups WHERE regroup IS NOT NULL") if name in json.loads(r["members"])]

    def _new_group_id(self, members: frozenset[str], version: int) -> str:
        group_id = "g-" + hashlib.sha1("\0".join(sorted(members)).encode()).hexdigest()[:10]
        if self._group_row(group_id) is not None:  # kept by a group whose members changed since
            group_id += f"-{version}"
        return group_id

    def set_groups(self, setup: Any) -> tuple[dict[str, Any], list[Change]]:
        """Propose a fusion setup; tasks it leaves out keep their group.

        Groups whose membership is in force already are left alone; every other group
        the setup needs (the rests of the groups its tasks leave included) is proposed
        and built, and the whole setup takes over only once all of them serve (see the
        module docstring). The result's "regroup" is the one this request started or
        joined, None when the setup is in force already.
        """
        rows = {r["name"]: r for r in self.db.all("SELECT * FROM functions")}
        wanted = validate_setup(setup, set(rows))
        now = time.time()

        def versions(members: frozenset[str]) -> dict[str, int]:
            return {n: rows[n]["version"] or rows[n]["latest_version"] for n in sorted(members)}

        with self.db.tx():
            in_force = {frozenset(json.loads(r["members"])) for r in self.db.all(
                "SELECT members FROM groups WHERE regroup IS NULL")}
            named = {n for group in wanted for n in group}
            target = {frozenset(group) for group in wanted}
            target |= {members - named for members in in_force if members & named and members - named}
            needed = target - in_force
            for members in needed:
                merge_specs(self._member_specs(versions(members)))  # raises Conflict before anything changes
            under_way = self.db.one("SELECT id FROM regroups WHERE state='deploying'")
            proposed = {frozenset(json.loads(r["members"])): r["id"] for r in self.db.all(
                "SELECT id, members FROM groups WHERE regroup IS NOT NULL")}
            if under_way is not None and set(proposed) == needed:  # asked again for what is under way
                return {**self.list_groups(), "regroup": self.get_regroup(under_way["id"])}, []
            events: list[Change] = []
            regroup_id = None
            if needed:
                regroup_id = self.db.execute(
                    "INSERT INTO regroups (setup, state, error, failed_tasks, log_tail, created_at, updated_at)"
                    " VALUES (?, 'deploying', NULL, '[]', NULL, ?, ?) RETURNING id", (json.dumps(wanted), now, now)).fetchone()[0]
                self.db.execute("DELETE FROM regroups WHERE state!='deploying' AND id NOT IN (SELECT id FROM regroups"
                                " ORDER BY id DESC LIMIT ?)", (REGROUP_HISTORY,))
                for members in needed & set(proposed):  # proposed already: keep building it
                    self.db.execute("UPDATE groups SET regroup=? WHERE id=?", (regroup_id, proposed[members]))
            if under_way is not None:
                events += self._end_regroup(under_way["id"], "superseded", "a newer setup was requested", [], "", now)
            for members in sorted(needed - set(proposed), key=sorted):
                version = self.next_group_version()
                group_id = self._new_group_id(members, version)
                self.db.execute(
                    "INSERT INTO groups (id, members, version, version_counter, ready_version, ready_members, state,"
                    " replicas_desired, error, regroup, created_at, updated_at) VALUES (?, ?, ?, ?, 0, '{}',"
                    " 'deploying', ?, NULL, ?, ?, ?)",
                    (group_id, json.dumps(versions(members)), version, version,
                     self._inherited_replicas(versions(members), rows), regroup_id, now, now))
                events.append(("group.changed", {"group": self.group_record(self._group_row(group_id))}))
            if regroup_id is not None:
                events.append(("regroup.changed", {"regroup": self.get_regroup(regroup_id)}))
                events += self._commit_if_ready(regroup_id, now)  # kept groups may all serve already
            self._sequenced(events)
            return {**self.list_groups(), "regroup": self.get_regroup(regroup_id) if regroup_id else None}, events

    def _redeploy_replicas(self, group: Any, members: dict[str, int], overrides: dict[str, dict[str, Any]]) -> int:
        """A redeployed group keeps the replicas it runs (what its load needs), within the new version's bounds;
        a group at zero starts at its minimum, as a deploy always did."""
        low = self._group_replicas(members, overrides)
        high = scale_bounds(self._member_specs(members, overrides))["max_replicas"]
        return max(low, min(high, int(group["replicas_desired"])))

    def _inherited_replicas(self, members: dict[str, int], rows: dict[str, Any]) -> int:
        """A proposed group's first replica count: the share of the replicas its members' groups run now
        (a group's replicas split evenly among its members), so a regroup under load starts at what the
        load needs instead of at the minimum; within the new group's bounds."""
        share = 0.0
        for name in members:
            old = self._group_row(rows[name]["group_id"]) if name in rows else None
            if old is not None:
                share += int(old["replicas_desired"]) / max(len(json.loads(old["members"])), 1)
        low = self._group_replicas(members)
        high = scale_bounds(self._member_specs(members))["max_replicas"]
        return max(low, min(high, math.ceil(share - 1e-9)))

    def _commit_if_ready(self, regroup_id: int, now: float) -> list[Change]:
        """Put a regroup in force once every group it proposed serves: its tasks move in, the groups they left go."""
        proposed = self.db.all("SELECT * FROM groups WHERE regroup=?", (regroup_id,))
        if not proposed or any(r["ready_version"] != r["version"] or r["state"] != "ready" for r in proposed):
            return []
        events: list[Change] = []
        moved: dict[str, str] = {}
        for row in proposed:
            self.db.execute("UPDATE groups SET regroup=NULL, updated_at=? WHERE id=?", (now, row["id"]))
            moved.update({name: row["id"] for name in json.loads(row["members"])})
        left = {r["group_id"] for r in self.db.all("SELECT name, group_id FROM functions") if r["name"] in moved}
        for name, group_id in moved.items():
            self.db.execute("UPDATE functions SET group_id=?, updated_at=? WHERE name=?", (group_id, now, name))
        for row in proposed:
            self._promote(json.loads(row["members"]), now)
        for old_id in sorted(left - set(moved.values())):
            old = self._group_row(old_id)
            if old is None:
                continue
            kept = {k: v for k, v in json.loads(old["members"]).items() if k not in moved}
            if not kept:
                self.db.execute("DELETE FROM groups WHERE id=?", (old_id,))
                events.append(("group.deleted", {"group_id": old_id}))
                continue
            # not reached as things stand (a redeploy or delete of a proposed task cancels the regroup); a
            # task the regroup did not move keeps its group, whose instances serve it already
            ready_kept = {k: v for k, v in json.loads(old["ready_members"]).items() if k in kept}
            self.db.execute("UPDATE groups SET members=?, ready_members=?, replicas_desired=?, updated_at=? WHERE id=?",
                            (json.dumps(kept), json.dumps(ready_kept), self._group_replicas(kept), now, old_id))
            events.append(("group.changed", {"group": self.group_record(self._group_row(old_id))}))
        for row in proposed:
            events.append(("group.changed", {"group": self.group_record(self._group_row(row["id"]))}))
        for name in sorted(moved):
            events.append(("function.changed", {"function": self.get_function(name)}))
        self.db.execute("UPDATE regroups SET state='done', updated_at=? WHERE id=?", (now, regroup_id))
        events.append(("regroup.changed", {"regroup": self.get_regroup(regroup_id)}))
        return events

    def _regroup_failed(self, group: Any, error: str, log_tail: str, tasks: list[str], now: float) -> list[Change]:
        """A proposed group failed: its regroup ends, naming the members that failed; nothing in force changes."""
        members = sorted(json.loads(group["members"]))
        failed = [t for t in tasks if t in members] or members
        others = [m for m in members if m not in failed]
        who = ("task " if len(failed) == 1 else "tasks ") + ", ".join(f"'{t}'" for t in failed)
        message = f"{who} failed" + (f" (fused with {', '.join(repr(o) for o in others)})" if others else "") + f": {error}"
        events: list[Change] = [("deploy.failed", {"group_id": group["id"], "group_version": group["version"],
                                                  "error": message, "log_tail": log_tail, "functions": []})]
        return events + self._end_regroup(group["regroup"], "failed", message, failed, log_tail, now)

    def _end_regroup(self, regroup_id: int, state: str, error: str, tasks: list[str], log_tail: str,
                     now: float) -> list[Change]:
        """End a regroup that will not take over: the groups it proposed go, the setup in force stays."""
        events: list[Change] = []
        for row in self.db.all("SELECT id FROM groups WHERE regroup=?", (regroup_id,)):
            self.db.execute("DELETE FROM groups WHERE id=?", (row["id"],))
            events.append(("group.deleted", {"group_id": row["id"]}))
        self.db.execute("UPDATE regroups SET state=?, error=?, failed_tasks=?, log_tail=?, updated_at=? WHERE id=?",
                        (state, error, json.dumps(tasks), log_tail, now, regroup_id))
        events.append(("regroup.changed", {"regroup": self.get_regroup(regroup_id)}))
        return events

    # ----- small documents (the optimizer's status) -------------------------------------

    def kv_put(self, key: str, value: Any) -> None:
        with self.db.tx():
            self._kv_write(key, value)

    def _kv_write(self, key: str, value: Any) -> None:
        """Within a transaction already open."""
        self.db.execute("INSERT INTO kv (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET"
                        " value=excluded.value, updated_at=excluded.updated_at", (key, json.dumps(value), time.time()))

    def kv_get(self, key: str) -> Any:
        row = self.db.one("SELECT value FROM kv WHERE key=?", (key,))
        return json.loads(row["value"]) if row else None

    # ----- scaling ------------------------------------------------------------------------

    def replicas_overrides(self) -> dict[str, int]:
        """Functions held at a replica count by PUT /functions/{name}/replicas, until it is given back."""
        return self.kv_get(REPLICAS_OVERRIDES_KEY) or {}

    def set_replicas_override(self, name: str, replicas: int | None) -> tuple[dict[str, Any], list[Change]]:
        """Hold a function's group at ``replicas`` (within the function's minReplicas-maxReplicas, at least 1),
        or give it back to the autoscaler (None)."""
        row = self._function_row(name)
        shown = row["version"] or row["latest_version"]
        ver = self.db.one("SELECT spec FROM function_versions WHERE name=? AND version=?", (name, shown))
        spec = upgrade_stored(json.loads(ver["spec"])) if ver else {}
        low = max(int(spec.get("min_replicas", 1)), 1)
        high = max(int(spec.get("max_replicas") or low), low)
        overrides = self.replicas_overrides()
        if replicas is not None and not low <= replicas <= high:
            raise InvalidRequest(
                f"replicas {replicas} is out of range for function '{name}': use {low}-{high} (its spec.minReplicas,"
                f" at least 1, to spec.maxReplicas), or null to give its replicas back to the autoscaler",
                {"function": name, "min": low, "max": high})
        if replicas is None:
            overrides.pop(name, None)
        else:
            overrides[name] = replicas
        self.kv_put(REPLICAS_OVERRIDES_KEY, overrides)
        events: list[Change] = []
        scaled = None
        if replicas is not None:
            result, events = self.scale_group(row["group_id"], replicas, f"manual override of '{name}'")
            scaled = result["replicas"]
        return {"function": name, "group_id": row["group_id"], "override": replicas, "replicas": scaled}, events

    def scale_group(self, group_id: str, replicas: int, reason: str = "") -> tuple[dict[str, Any], list[Change]]:
        """Set a group's replica target: 0 scales it to zero, waking it gives it its minimum back (at least 1)."""
        if replicas < 0 or replicas > 64:
            raise InvalidRequest(f"replicas {replicas} is out of range 0-64")
        now = time.time()
        with self.db.tx():
            row = self._group_row(group_id)
            if row is None:
                raise NotFound(f"group '{group_id}' not found")
            members = json.loads(row["members"])
            if replicas > 0:
                # within the group's bounds: its minimum (at least 1) and the least maxReplicas of its members
                replicas = max(min(replicas, scale_bounds(self._member_specs(members))["max_replicas"]),
                               self._group_replicas(members))
            self.db.execute("UPDATE groups SET replicas_desired=?, updated_at=? WHERE id=?", (replicas, now, group_id))
            for name in members:
                fn = self.db.one("SELECT state, version FROM functions WHERE name=?", (name,))
                if fn is None:
                    continue
                if replicas == 0 and fn["state"] == "ready":
                    self.db.execute("UPDATE functions SET state='scaledToZero', updated_at=? WHERE name=?", (now, name))
                elif replicas > 0 and fn["state"] == "scaledToZero":
                    self.db.execute("UPDATE functions SET state='ready', updated_at=? WHERE name=?", (now, name))
            payloads: list[Change] = [("group.changed", {"group": self.group_record(self._group_row(group_id))})]
            for name in members:
                if self.db.one("SELECT 1 FROM functions WHERE name=?", (name,)):
                    payloads.append(("function.changed", {"function": self.get_function(name)}))
            first = self.next_seqs(len(payloads))
        for i, (_, data) in enumerate(payloads):
            data["seq"] = first + i
        return {"group_id": group_id, "replicas": replicas, "reason": reason}, payloads

    # ----- gateways (shared/gateways.py) ---------------------------------------------------

    def live_gateways(self, ttl_s: float, now: float | None = None) -> list[dict[str, Any]]:
        cutoff = (time.time() if now is None else now) - ttl_s
        rows = self.db.all("SELECT record FROM gateways WHERE seen_at >= ? ORDER BY started_at, id", (cutoff,))
        return [json.loads(r["record"]) for r in rows]

    def announce_gateway(self, record: dict[str, Any], ttl_s: float) -> tuple[dict[str, Any], list[Change]]:
        """A gateway's beat: its row refreshed (``gateway.changed`` when it is new), the silent ones dropped
        (``gateway.gone``); answers the live gateways."""
        gid = record.get("id")
        if not isinstance(gid, str) or not gid or not all(isinstance(record.get(k, ""), str) for k in record):
            raise InvalidRequest("a gateway record needs an 'id' and string fields (shared/gateways.py)")
        now = time.time()
        payloads: list[Change] = []
        with self.db.tx():
            for row in self.db.all("SELECT id FROM gateways WHERE seen_at < ? AND id != ?", (now - ttl_s, gid)):
                self.db.execute("DELETE FROM gateways WHERE id=?", (row["id"],))
                payloads.append(("gateway.gone", {"id": row["id"], "reason": f"silent for over {ttl_s:g} s"}))
            text = json.dumps(record, sort_keys=True)
            row = self.db.one("SELECT record FROM gateways WHERE id=?", (gid,))
            if row is None or row["record"] != text:
                self.db.execute("INSERT INTO gateways (id, record, started_at, seen_at) VALUES (?, ?, ?, ?) ON"
                                " CONFLICT(id) DO UPDATE SET record=excluded.record, seen_at=excluded.seen_at",
                                (gid, text, now, now))
                payloads.append(("gateway.changed", {"gateway": record}))
            else:
                self.db.execute("UPDATE gateways SET seen_at=? WHERE id=?", (now, gid))
            live = self.live_gateways(ttl_s, now)
            self._sequenced(payloads)
        return {"gateways": live}, payloads

    def gateway_bye(self, gateway_id: str) -> tuple[dict[str, Any], list[Change]]:
        """A gateway stopping in order: gone at once, so its async calls are claimed without waiting out its TTL."""
        with self.db.tx():
            removed = self.db.execute("DELETE FROM gateways WHERE id=?", (gateway_id,)).rowcount
            payloads: list[Change] = [("gateway.gone", {"id": gateway_id, "reason": "stopped"})] if removed else []
            self._sequenced(payloads)
        return {"removed": bool(removed)}, payloads
