"""Settings: defaults, TOML file, MOERAG_* variables, --home; bad values say which setting."""



import pytest

from app.settings import SettingsError, load_settings


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    (home / "config.toml").write_text('collection = "from-file"\nchunk_tokens = 200\nsearch_k = 7\n')
    env = {"MOERAG_HOME": str(home), "MOERAG_SEARCH_K": "12"}
    s = load_settings(env=env)
    assert s.home == home and s.collection == "from-file" and s.chunk_tokens == 200 and s.search_k == 12
    assert s.db_url == f"sqlite:///{home / 'moerag.db'}"
    other = tmp_path / "other"
    assert load_settings(home=other, env=env).home == other
    assert load_settings(env={}).collection == "default"


def test_bad_values_name_the_setting(tmp_path):
    with pytest.raises(SettingsError, match="MOERAG_CHUNK_TOKENS"):
        load_settings(env={"MOERAG_HOME": str(tmp_path), "MOERAG_CHUNK_TOKENS": "lots"})
    with pytest.raises(SettingsError, match="hybrid, dense or bm25"):
        load_settings(env={"MOERAG_HOME": str(tmp_path), "MOERAG_SEARCH_MODE": "magic"})
    (tmp_path / "config.toml").write_text("colection = 'typo'\n")
    with pytest.raises(SettingsError, match="colection"):
        load_settings(env={"MOERAG_HOME": str(tmp_path)})
