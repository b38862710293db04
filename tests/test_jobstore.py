"""The job store on both storage backends: create once, and state updates that never lose a write."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from conftest import tiny_spec
from segmodel.jobs import JobNotFound, JobState, JobStore
from segmodel.storage import Storage, open_storage


class JobStoreContract:
    """Subclasses provide `where`: a storage location (folder or URL) of their backend, empty."""

    def test_create_and_read(self, where: str, tiny_data: dict[str, Path]) -> None:
        store = JobStore(where)
        spec = tiny_spec(tiny_data)
        job_id, state = store.create(spec, "job-1")
        assert store.spec(job_id) == spec
        assert store.state(job_id).model_dump() == state.model_dump()
        assert store.ids() == ["job-1"] and store.exists("job-1")
        with pytest.raises(FileExistsError, match="job job-1 already exists"):
            store.create(spec, "job-1")

    def test_spec_without_state_is_no_job(self, where: str, tiny_data: dict[str, Path]) -> None:
        store = JobStore(where)
        store.backend.put("jobs/half/job.json", tiny_spec(tiny_data).model_dump_json().encode())
        assert store.ids() == [] and not store.exists("half")
        with pytest.raises(JobNotFound):
            store.update("half", lambda s: None)

    @pytest.mark.parametrize("job_id", ["../x", "UPPER", "a/b", ""])
    def test_bad_ids_are_not_found(self, where: str, job_id: str) -> None:
        with pytest.raises(JobNotFound):
            JobStore(where).state(job_id)

    def test_unchanged_state_is_not_written(self, where: str, tiny_data: dict[str, Path]) -> None:
        store = JobStore(where)
        store.create(tiny_spec(tiny_data), "job-1")
        _, before = store.backend.get_versioned("jobs/job-1/state.json")
        assert store.update("job-1", lambda s: s.chunk == 0) [1] is True
        assert store.backend.get_versioned("jobs/job-1/state.json")[1] == before

    def test_concurrent_updates_lose_nothing(self, where: str, tiny_data: dict[str, Path]) -> None:
        JobStore(where).create(tiny_spec(tiny_data), "job-1")

        def bump(n: int) -> None:
            store = JobStore(where)  # its own client, as another process would have
            for _ in range(n):
                store.update("job-1", lambda s: setattr(s, "attempts", s.attempts + 1))

        threads = [threading.Thread(target=bump, args=(5,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert JobStore(where).state("job-1").attempts == 20

    def test_a_write_in_between_is_kept_and_the_change_redone(self, where: str, tiny_data: dict[str, Path]) -> None:
        store = JobStore(where)
        store.create(tiny_spec(tiny_data), "job-1")
        seen: list[int] = []

        def change(s: JobState) -> None:
            seen.append(s.step)
            if len(seen) == 1:  # someone else writes after we read: our write must not clobber theirs
                other = JobStore(where).state("job-1")
                other.step = 3
                store.backend.put("jobs/job-1/state.json", other.model_dump_json().encode())
            s.attempts += 1

        state, _ = store.update("job-1", change)
        assert seen == [0, 3]
        assert (state.step, state.attempts) == (3, 1)
        assert store.state("job-1").model_dump() == state.model_dump()


class TestLocalJobStore(JobStoreContract):
    @pytest.fixture
    def where(self, tmp_path: Path) -> str:
        return str(tmp_path / "storage")

    def test_planted_symlink_is_not_a_job(self, tmp_path: Path, tiny_data: dict[str, Path]) -> None:
        store = JobStore(tmp_path / "storage")
        store.create(tiny_spec(tiny_data), "job-1")
        (tmp_path / "storage" / "jobs" / "evil").symlink_to(tmp_path)
        with pytest.raises(JobNotFound):
            store.layout("evil")


class TestObjectJobStore(JobStoreContract):
    @pytest.fixture
    def where(self, s3_bucket: str) -> str:
        return f"s3://{s3_bucket}/relay"

    def test_backend_is_the_bucket(self, where: str) -> None:
        store: Storage = JobStore(where).backend
        assert store.url == open_storage(where).url == where
