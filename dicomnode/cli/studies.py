"""``dicomnode studies``: what was received, per study and series.

Imports of the store, infer and encode packages are made inside the command
functions: every command module is loaded to build the parser, and importing
those packages costs 0.4-0.7 s each (measured), which `dicomnode --help` and
the other commands should not pay.
"""

from __future__ import annotations

import argparse
import json

from dicomnode.cli.common import settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("studies", help="list received studies and series (counts, state, job)")
    p.add_argument("--study", help="only this Study Instance UID")
    p.add_argument("--limit", type=int, default=200, help="newest N studies (default 200)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dicomnode.store import Store  # on use, see module docstring

    settings = settings_from_args(args)
    with Store.open(settings) as store:
        studies = store.studies(args.study, limit=args.limit)
    if args.json:
        out = []
        for st in studies:
            out.append({
                "study_uid": st.study_uid, "patient_id": st.patient_id,
                "patient_name": st.patient_name, "study_date": st.study_date,
                "accession_number": st.accession_number, "description": st.description,
                "series": [{
                    "series_uid": se.series_uid, "modality": se.modality,
                    "description": se.description, "version": se.version, "state": se.state,
                    "instances": se.instance_count, "expected": se.expected_count,
                    "missing_files": se.missing_files,
                    "last_received_at": se.last_received_at.isoformat()
                    if se.last_received_at else None,
                    "job_id": se.job_id, "job_state": se.job_state.value if se.job_state else None,
                } for se in st.series],
            })
        print(json.dumps(out, indent=2))
        return 0
    if not studies:
        print("no studies received")
        return 0
    for st in studies:
        print(f"study {st.study_uid}  patient {st.patient_id or '-'} {st.patient_name or ''}  "
              f"date {st.study_date or '-'}  accession {st.accession_number or '-'}")
        for se in st.series:
            exp = f"/{se.expected_count}" if se.expected_count else ""
            miss = f"  MISSING FILES: {se.missing_files}" if se.missing_files else ""
            job = (f"job {se.job_id} {se.job_state.value}" if se.job_id and se.job_state
                   else "no job yet")
            print(f"  series {se.series_uid}  {se.modality or '-':<3} v{se.version} "
                  f"{se.instance_count}{exp} instances  {se.state}  {job}{miss}")
    return 0
