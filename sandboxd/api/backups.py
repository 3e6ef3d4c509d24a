"""createBackup, restoreBackup, listBackups, deleteBackup, forkSandbox, exportSandbox,
importSandbox: thin layers over ``sandboxd.persistence`` (docs/persistence.md)."""

from __future__ import annotations

import base64
import binascii

from .. import errors, persistence, protocol
from ..context import Context


def _info(meta: persistence.BackupMeta) -> protocol.BackupInfo:
    return protocol.convert_result("createBackup", meta.wire(), protocol.BackupInfo)


async def create_backup(ctx: Context, p: protocol.CreateBackupParams) -> protocol.BackupInfo:
    meta = await persistence.create_backup(ctx.rooms, ctx.uid, p.sandbox_id, p.dir, p.name,
                                           p.excludes, p.ttl_seconds)
    return _info(meta)


async def restore_backup(ctx: Context,
                         p: protocol.RestoreBackupParams) -> protocol.RestoreBackupResult:
    meta = await persistence.restore_backup(ctx.rooms, ctx.uid, p.sandbox_id, p.backup_id, p.dir)
    return protocol.RestoreBackupResult(sandbox_id=p.sandbox_id, dir=meta.dir,
                                        backup_id=p.backup_id)


async def list_backups(ctx: Context, p: protocol.ListBackupsParams) -> protocol.ListBackupsResult:
    store = persistence.Store(ctx.config.state_dir)
    metas = [m for m in store.live(ctx.uid)
             if p.sandbox_id is None or m.sandbox_id == p.sandbox_id]
    return protocol.ListBackupsResult(backups=[_info(m) for m in metas])


async def delete_backup(ctx: Context,
                        p: protocol.DeleteBackupParams) -> protocol.DeleteBackupResult:
    store = persistence.Store(ctx.config.state_dir)
    try:
        deleted = store.delete(ctx.uid, p.backup_id)
    except errors.BackupNotFound:
        deleted = False
    return protocol.DeleteBackupResult(backup_id=p.backup_id, deleted=deleted)


async def fork_sandbox(ctx: Context, p: protocol.ForkSandboxParams) -> protocol.ForkSandboxResult:
    await persistence.fork_sandbox(ctx.rooms, ctx.uid, p.sandbox_id, p.new_sandbox_id)
    return protocol.ForkSandboxResult(sandbox_id=p.sandbox_id, new_sandbox_id=p.new_sandbox_id)


async def export_sandbox(ctx: Context,
                         p: protocol.ExportSandboxParams) -> protocol.ExportSandboxResult:
    async def send(chunk: bytes, offset: int) -> None:
        await ctx.notify(protocol.ExportChunk(request_id=ctx.request_id,
                                              data=base64.b64encode(chunk).decode(),
                                              offset=offset))

    d, size, digest, chunks = await persistence.export_sandbox(
        ctx.rooms, ctx.uid, p.sandbox_id, p.dir, p.excludes, send)
    return protocol.ExportSandboxResult(sandbox_id=p.sandbox_id, dir=d, size_bytes=size,
                                        sha256=digest, chunks=chunks)


async def import_sandbox(ctx: Context,
                         p: protocol.ImportSandboxParams) -> protocol.ImportSandboxResult:
    try:
        data = base64.b64decode(p.data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise errors.ValidationError("data is not valid base64", field="data") from err
    d, size, digest = await persistence.import_sandbox(ctx.rooms, ctx.uid, p.sandbox_id, p.dir,
                                                       data, p.append, p.final)
    return protocol.ImportSandboxResult(sandbox_id=p.sandbox_id, dir=d, size_bytes=size,
                                        imported=p.final,
                                        sha256=digest if p.final else protocol.UNSET)
