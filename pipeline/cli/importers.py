"""`hyrank import <dataset>`: public datasets written as the day-partitioned logs the pipeline reads
(pipeline/data/importers/)."""

from __future__ import annotations

from pathlib import Path

from hyrank.pipeline.cli import verb


def add_verbs(verbs) -> None:
    from hyrank.pipeline.data.importers.movielens import DEFAULT_MAX_LEN, default_source

    p = verb(verbs, "import", _import_menu)
    p.set_defaults(print_help=p.print_help)
    datasets = p.add_subparsers(title="datasets", metavar="<dataset>")
    ml = verb(datasets, "movielens-100k", _movielens_100k)
    source = default_source()
    ml.add_argument("--src", type=Path, default=source, required=source is None,
                    help="folder holding u.data, u.user, u.item, u.genre, u.occupation as GroupLens ships them; "
                    "the default is ../shared/data/movielens-100k beside the repository, when it is there")
    ml.add_argument("--out", required=True, type=Path, help="dataset root to write <partition-key>=YYYY-MM-DD/ under")
    ml.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                    help="events kept per behaviour sequence: the most recent ones")
    ml.add_argument("--partition-key", default="day", help="folder key: <key>=YYYY-MM-DD")


def _import_menu(args) -> int:
    """Import a public dataset as day-partitioned click logs.

    Writes <out>/day=YYYY-MM-DD/part-00000.parquet plus _SUCCESS per day, as `hyrank gen-logs` does, so that
    train, stream, predict and serve read it like any logs. The data is read from where you keep it: it is
    never downloaded or committed.

    Examples:
      hyrank import movielens-100k --out data/ml100k
      hyrank import movielens-100k --help
    """
    args.print_help()
    return 2


def _movielens_100k(args) -> int:
    """Import MovieLens-100K: one row per rating, label click = rating >= 4, a day per UTC date.

    Columns: user_id, user_age_bucket, user_gender, user_occupation, user_zip3 (all ids); item_id, item_genres
    (list), item_primary_genre, item_year_bucket; hour and weekday (UTC); user_prior_ratings and
    item_prior_ratings (counts of earlier ratings, float); and two behaviour sequences, oldest first, the most
    recent --max-len events: hist_item_ids (every item the user rated strictly before, by timestamp: ratings of
    the same second are not in each other's) and click_item_ids (the same for ratings >= 4), each with an aligned
    list of the items' primary genres (hist_item_genres, click_item_genres). Also ts and rating, which no config
    should read as features. A re-run replaces every day whole; same input, identical files.
    jobs/configs/movielens.toml reads it; the summary prints the recommended time split.

    Examples:
      hyrank import movielens-100k --out data/ml100k
      hyrank import movielens-100k --src ~/data/ml-100k --out data/ml100k --max-len 50
      hyrank train --config jobs/configs/movielens.toml --days 1997-09-20..1998-03-07 \\
          --eval-days 1998-03-08..1998-03-31          # the recommended validation span, as one set
    """
    from hyrank.pipeline.data.importers.movielens import SPLITS, import_movielens

    summary = import_movielens(args.src, args.out, max_len=args.max_len, partition_key=args.partition_key)
    for line in summary.lines():
        print(line)
    print(f"next: hyrank train --config jobs/configs/movielens.toml --set 'data.root=\"{args.out}\"' "
          f"--days {SPLITS['train']} --eval-days {SPLITS['validate']}")
    return 0
