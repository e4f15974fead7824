"""core.lookups: `field__any=ids` finds what `field__in=ids` finds, sends the ids as one array
parameter on PostgreSQL, and refuses anything but integer ids."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth.models import Group, Permission
from django.db import connection

from core.lookups import decimal_array, int_array


@pytest.mark.django_db
def test_any_finds_what_in_finds_on_primary_and_foreign_keys() -> None:
    groups = [Group.objects.create(name=f"g{i}") for i in range(6)]
    wanted = [groups[1].pk, groups[4].pk, groups[5].pk, 10**12]  # one id that does not exist
    assert sorted(Group.objects.filter(pk__any=wanted).values_list("pk", flat=True)) == sorted(
        Group.objects.filter(pk__in=wanted).values_list("pk", flat=True)
    )
    assert list(Group.objects.filter(pk__any=[])) == []
    assert Group.objects.filter(pk__any={groups[0].pk}).get() == groups[0]  # any iterable
    # On a foreign key, by its column or its name.
    some = list(Permission.objects.values_list("content_type_id", flat=True).distinct()[:3])
    expected = sorted(Permission.objects.filter(content_type_id__in=some).values_list("pk", flat=True))
    assert expected
    assert sorted(Permission.objects.filter(content_type_id__any=some).values_list("pk", flat=True)) == expected
    assert sorted(Permission.objects.filter(content_type__any=some).values_list("pk", flat=True)) == expected
    # In a write, as the matcher's locks and writes use it.
    assert Group.objects.filter(pk__any=wanted).delete()[0] == 3
    assert Group.objects.count() == 3


@pytest.mark.django_db
def test_on_postgresql_the_ids_are_one_parameter_however_many() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the array parameter is PostgreSQL's")
    ids = list(range(1, 5001))
    query = Group.objects.filter(pk__any=ids).values_list("pk", flat=True)
    sql, params = query.query.get_compiler(connection=connection).as_sql()
    assert "= ANY(%s::bigint[])" in sql
    # the 5,000 ids travel as one array literal, not as an IN list nor a list psycopg quotes id by id
    assert list(params) == ["{" + ",".join(str(i) for i in ids) + "}"]
    assert list(query) == []
    assert list(Group.objects.filter(pk__any=[]).values_list("pk", flat=True)) == []


@pytest.mark.django_db
@pytest.mark.parametrize("bad", [["1"], [1.5], [True], [None]])
def test_anything_but_integer_ids_is_refused(bad: list[object]) -> None:
    with pytest.raises(TypeError, match="integer ids"):
        list(Group.objects.filter(pk__any=bad))


def test_array_literals_carry_integers_and_decimals_only() -> None:
    assert int_array([3, -1, 10**15]) == "{3,-1,1000000000000000}"
    assert int_array([]) == "{}"
    assert decimal_array([Decimal("0.100000"), Decimal("1E+1")]) == "{0.100000,1E+1}"
    for bad in (["1}"], [1.5], [None]):
        with pytest.raises(TypeError):
            int_array(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decimal_array(["1}"])  # type: ignore[list-item]


@pytest.mark.django_db
def test_postgresql_reads_a_decimal_literal_to_its_value_and_scale() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the array literal is PostgreSQL's")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT v::text FROM unnest(%s::numeric[]) AS v",
            [decimal_array([Decimal("1.234500"), Decimal("1E+1"), Decimal("-0.000001")])],
        )
        assert [row[0] for row in cursor.fetchall()] == ["1.234500", "10", "-0.000001"]
