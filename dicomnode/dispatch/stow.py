"""DICOMweb out: STOW-RS to a ``kind: dicomweb`` destination, with ``dicomweb-client``.

::

    claimed files -> requests of at most ``MAX_REQUEST_BYTES`` (POST <url>/studies,
    multipart/related; type="application/dicom") -> per-instance outcomes

The STOW-RS response (PS3.18 10.5.3) is parsed per instance, and mapped onto the same
classification as a C-STORE's status (:func:`dicomnode.dispatch.scu.is_transient_status`):

* an instance in the Referenced SOP Sequence is stored; with a Warning Reason
  (0008,1196) it is stored with that warning (recorded, like a C-STORE warning);
* an instance in the Failed SOP Sequence failed with its Failure Reason (0008,1197),
  a C-STORE status code: 0xA7xx (out of resources) and processing failures are
  transient, 0xA9xx / 0xCxxx, SOP class not supported, not authorised are permanent;
* an instance the answer does not mention is not known to be stored: transient.

With no per-instance answer the HTTP status decides for the whole request: 2xx stored;
408, 425, 429, 5xx, timeouts and refused connections transient; other 4xx (bad
request, unauthorised, forbidden, unsupported media type) permanent.

dicomweb-client's own retries are switched off: the outbox's retry policy (backoff until
the destination's ``retry_deadline_seconds``) is the one that applies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import requests
import requests.adapters
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from dicomnode.config import DestinationConfig
from dicomnode.dispatch.scu import FileOutcome, OutcomeState, is_transient_status, status_text
from dicomnode.errors import DispatchError

#: One STOW-RS request carries files up to this many bytes (a single larger file goes alone).
MAX_REQUEST_BYTES = 64 << 20
_TRANSIENT_HTTP = {408, 425, 429}


def _secret(dest: DestinationConfig, env_name: str, what: str) -> str:
    value = os.environ.get(env_name, "")
    if not value:
        raise DispatchError(f"destination {dest.name}: environment variable {env_name} "
                            f"({what}) is not set", transient=False)
    return value


def session_for(dest: DestinationConfig) -> requests.Session:
    """A requests session with the destination's authentication and TLS settings."""
    session = requests.Session()
    session.headers["User-Agent"] = "dicomnode"
    if dest.auth == "basic":
        session.auth = (dest.username, _secret(dest, dest.password_env, "password"))
    elif dest.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {_secret(dest, dest.token_env, 'token')}"
    if dest.ca_bundle is not None or not dest.verify_tls:
        verify: bool | str = str(dest.ca_bundle) if dest.verify_tls else False
        session.verify = verify
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's verify
        # (psf/requests#3829): the adapter pins this destination's choice per request.
        session.mount("https://", _PinnedVerify(verify))
    return session


class _PinnedVerify(requests.adapters.HTTPAdapter):
    """An HTTPS adapter that always verifies with the destination's setting."""

    def __init__(self, verify: bool | str) -> None:
        super().__init__()
        self._verify = verify

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: float | tuple[float | None, float | None] | None = None,
             verify: bool | str = True, cert: str | tuple[str, str] | None = None,
             proxies: dict[str, str] | None = None) -> requests.Response:
        return super().send(request, stream=stream, timeout=timeout, verify=self._verify,
                            cert=cert, proxies=proxies)


def client_for(dest: DestinationConfig) -> DICOMwebClient:
    client = DICOMwebClient(dest.url.rstrip("/"), session=session_for(dest),
                            timeout=dest.timeout_seconds)
    client.set_http_retry_params(retry=False)
    return client


def _failed(path: Path, uid: str, cls: str, message: str, *, transient: bool,
            status: int | None = None) -> FileOutcome:
    return FileOutcome(path, uid, cls, OutcomeState.FAILED, status, transient, message)


def _reason(item: Dataset, keyword: str) -> int | None:
    value = item.get(keyword)
    return None if value is None or value == "" else int(value)


def outcomes_from_response(dest: DestinationConfig, response: Dataset,
                           batch: Sequence[tuple[Path, str, str]]) -> list[FileOutcome]:
    """Per-instance outcomes of one STOW-RS response (see the module docstring)."""
    stored: dict[str, Dataset] = {str(it.get("ReferencedSOPInstanceUID", "")): it
                                  for it in response.get("ReferencedSOPSequence", [])}
    failed: dict[str, Dataset] = {str(it.get("ReferencedSOPInstanceUID", "")): it
                                  for it in response.get("FailedSOPSequence", [])}
    listed = bool(stored or failed)
    out = []
    for path, uid, cls in batch:
        if uid in failed:
            code = _reason(failed[uid], "FailureReason")
            if code is None:
                out.append(_failed(path, uid, cls, f"{dest.name}: STOW-RS failed the instance "
                                   "without a Failure Reason", transient=True))
            else:
                out.append(_failed(path, uid, cls, f"{dest.name}: STOW-RS Failure Reason "
                                   f"{status_text(code)}", transient=is_transient_status(code),
                                   status=code))
        elif uid in stored or not listed:
            code = _reason(stored[uid], "WarningReason") if uid in stored else None
            if code:
                out.append(FileOutcome(path, uid, cls, OutcomeState.WARNING, code, False,
                                       f"stored with warning {status_text(code)}"))
            else:
                out.append(FileOutcome(path, uid, cls, OutcomeState.STORED, 0, False,
                                       "stored"))
        else:
            out.append(_failed(path, uid, cls, f"{dest.name}: the STOW-RS answer does not "
                               "mention this instance", transient=True))
    return out


def response_dataset(resp: requests.Response | None) -> Dataset | None:
    """The DICOM JSON body of an error answer (e.g. 409 Conflict with a Failed SOP
    Sequence); None if there is none. Parsed whatever the Content-Type says: Orthanc's
    plugin sends its 409 without one."""
    if resp is None or resp.content.lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        data = resp.json()
        if isinstance(data, list):  # some servers wrap the one dataset in a list
            data = data[0] if data else {}
        return Dataset.from_json(data)
    except (ValueError, TypeError, KeyError, IndexError):
        return None


def _read(path: Path) -> tuple[Dataset | None, FileOutcome | None]:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a per-file failure
        return None, _failed(path, "", "", f"cannot read the DICOM file: {exc}", transient=False)
    uid = str(ds.get("SOPInstanceUID", "") or "")
    cls = str(ds.get("SOPClassUID", "") or "")
    if not uid or not cls:
        return None, _failed(path, uid, cls, "the file lacks SOP Class / Instance UID; cannot "
                             "send", transient=False)
    return ds, None


def stow_files(dest: DestinationConfig, paths: Sequence[Path]) -> tuple[FileOutcome, ...]:
    """STOW-RS ``paths`` to ``dest``; one outcome per path, in order (never raises for a
    peer's answer: a configuration problem, e.g. an unset secret, fails every file)."""
    outcomes: list[FileOutcome | None] = [None] * len(paths)
    try:
        client = client_for(dest)
    except DispatchError as exc:
        return tuple(_failed(Path(p), "", "", str(exc), transient=exc.transient)
                     for p in paths)
    requests_: list[list[tuple[int, Dataset, int]]] = [[]]
    size = 0
    for i, p in enumerate(paths):
        ds, bad = _read(Path(p))
        if bad is not None or ds is None:
            outcomes[i] = bad
            continue
        n = Path(p).stat().st_size
        if requests_[-1] and size + n > MAX_REQUEST_BYTES:
            requests_.append([])
            size = 0
        requests_[-1].append((i, ds, n))
        size += n
    for group in (g for g in requests_ if g):
        batch = [(Path(paths[i]), str(ds.SOPInstanceUID), str(ds.SOPClassUID))
                 for i, ds, _ in group]
        for (i, _, _), o in zip(group, _post(dest, client, [ds for _, ds, _ in group], batch),
                                strict=True):
            outcomes[i] = o
    return tuple(o for o in outcomes if o is not None)


def _post(dest: DestinationConfig, client: DICOMwebClient, datasets: list[Dataset],
          batch: list[tuple[Path, str, str]]) -> list[FileOutcome]:
    def all_failed(message: str, transient: bool, status: int | None = None) -> list[FileOutcome]:
        return [_failed(p, u, c, message, transient=transient, status=status)
                for p, u, c in batch]

    try:
        response: Any = client.store_instances(datasets)
    except requests.HTTPError as exc:
        resp = exc.response
        code = resp.status_code if resp is not None else 0
        answer = response_dataset(resp)
        if answer is not None and ("FailedSOPSequence" in answer
                                   or "ReferencedSOPSequence" in answer):
            return outcomes_from_response(dest, answer, batch)  # e.g. 409 Conflict
        text = (resp.text[:300].strip() if resp is not None else "") or str(exc)
        transient = code in _TRANSIENT_HTTP or code >= 500 or code == 0
        return all_failed(f"{dest.name}: STOW-RS answered HTTP {code}: {text}", transient)
    except requests.exceptions.SSLError as exc:
        return all_failed(f"{dest.name}: TLS error talking to {dest.url}: {exc}", False)
    except (requests.ConnectionError, requests.Timeout) as exc:
        return all_failed(f"{dest.name}: cannot reach {dest.url}: {type(exc).__name__}", True)
    except (requests.RequestException, ValueError) as exc:
        return all_failed(f"{dest.name}: STOW-RS failed: {exc}", True)
    if not isinstance(response, Dataset):  # pragma: no cover - the client's contract
        response = Dataset()
    return outcomes_from_response(dest, response, batch)
