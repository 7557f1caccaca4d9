"""An offline stand-in for `huggingface_hub.HfApi` that lays each upload out as the Hub cache would."""

import shutil
from pathlib import Path
from types import SimpleNamespace

SHA = "0123456789abcdef0123456789abcdef01234567"


class RecordingHubApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls and lays each upload out as the Hub cache
    would after a download (HF_HUB_CACHE/models--org--name/refs/main + snapshots/<sha>/...)."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.calls: list[tuple[str, str, dict]] = []
        self.uploaded: list[str] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        folder = Path(folder_path)
        self.uploaded = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / SHA)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(SHA)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{SHA}", oid=SHA)
