"""The CALVIN evaluation of eval_sim.py without the simulator: the official chain generator reproduced exactly,
the seeded scene reset, FNV-1, the instruction table, the metrics, and the rollout loop against a scripted
stand-in for calvin_env (a test double, defined here and used only here)."""
import hashlib
import importlib.util
import json
from collections import Counter

import numpy as np
import pytest

import eval_sim
from eval_sim import CALVIN_TASKS, EvalError

# The first chain of the official get_sequences(1000) (mees/calvin multistep_sequences.py), as the spec gives it
FIRST_STATE = {"led": 1, "lightbulb": 1, "slider": "left", "drawer": "open", "red_block": "slider_left",
               "blue_block": "table", "pink_block": "slider_right", "grasped": 0}
FIRST_CHAIN = ("rotate_blue_block_right", "move_slider_right", "lift_red_block_slider", "place_in_slider",
               "turn_off_lightbulb")
LAST_STATE = {"led": 1, "lightbulb": 0, "slider": "left", "drawer": "closed", "red_block": "slider_right",
              "blue_block": "slider_left", "pink_block": "table", "grasped": 0}  # of the official 1000th chain
# sha256 of json.dumps([[list(state.values()), list(chain)] for state, chain in get_sequences(1000)]), from running
# the official multistep_sequences.py (mees/calvin fa03f01, NumPy 2.4.6) with a stand-in for its one import,
# utils.temp_seed (save the global RNG state, seed, restore)
OFFICIAL_DIGEST = "ecb0cbef0beb0e4898d3a236c26494f46b950c707defc0b6ef61ce9278143451"


@pytest.fixture(scope="module")
def sequences():
    # ~10 s on an idle core: the official generator draws ~9M random 5-task chains to keep 1000
    return eval_sim.calvin_sequences(1000)


def test_chains_are_the_official_ones(sequences):
    assert len(sequences) == 1000
    assert sequences[0] == (FIRST_STATE, FIRST_CHAIN)
    assert sequences[999] == (LAST_STATE, ("move_slider_right", "turn_on_lightbulb", "push_pink_block_left",
                                           "open_drawer", "push_into_drawer"))
    blob = json.dumps([[list(state.values()), list(chain)] for state, chain in sequences])
    assert hashlib.sha256(blob.encode()).hexdigest() == OFFICIAL_DIGEST


def test_chains_have_the_official_properties(sequences):
    states = eval_sim.calvin_initial_states()
    assert len(states) == 192 and len({tuple(s.values()) for s in states}) == 192
    per_state = Counter(tuple(s.values()) for s, _ in sequences)
    assert len(per_state) == 192 and sorted(set(per_state.values())) == [5, 6]  # 1000 split evenly over 192
    assert len({chain[0] for _, chain in sequences}) == 27
    assert {task for _, chain in sequences for task in chain} == set(CALVIN_TASKS) and len(CALVIN_TASKS) == 34
    for state, chain in sequences:
        assert len(chain) == 5 and len({CALVIN_TASKS[t][0] for t in chain}) == 5  # 5 different categories
        for task in chain:  # every precondition holds, with exactly one outcome
            state = eval_sim.calvin_next_state(state, task)
            assert state is not None


def test_chain_generation_is_deterministic_per_state():
    a, b = eval_sim.calvin_chains_for_state(7, 6), eval_sim.calvin_chains_for_state(7, 6, batch=500)
    assert a == b and len(a) == 6  # the batch size only changes how far past the last chain it draws
    assert eval_sim.calvin_chains_for_state(7, 3) == a[:3]


def test_symbolic_rules():
    assert list(CALVIN_TASKS)[:2] == ["rotate_red_block_right", "rotate_red_block_left"]  # the draw order
    assert list(CALVIN_TASKS)[-1] == "push_into_drawer"
    assert len({category for category, _ in CALVIN_TASKS.values()}) == 11
    nxt = eval_sim.calvin_next_state
    after = nxt(FIRST_STATE, "move_slider_right")
    assert after == FIRST_STATE | {"slider": "right"} and FIRST_STATE["slider"] == "left"  # no mutation
    assert nxt(FIRST_STATE, "lift_red_block_slider") is None  # the door covers the red block's side
    held = nxt(after, "lift_red_block_slider")
    assert held["red_block"] == "grasped" and held["grasped"] == 1
    assert nxt(held, "open_drawer") is None  # nothing else while holding a block
    assert nxt(held, "place_in_slider")["red_block"] == "slider_right"
    # stacking needs a unique outcome: red held over blue and pink both on the table is ambiguous
    two_on_table = FIRST_STATE | {"red_block": "grasped", "pink_block": "table", "grasped": 1}
    assert nxt(two_on_table, "stack_block") is None
    one_on_table = FIRST_STATE | {"red_block": "grasped", "grasped": 1}
    assert nxt(one_on_table, "stack_block")["blue_block"] == "stacked_bottom"


def test_instruction_table():
    assert set(eval_sim.CALVIN_INSTRUCTIONS) == set(CALVIN_TASKS)
    assert len(set(eval_sim.CALVIN_INSTRUCTIONS.values())) == 34
    assert eval_sim.CALVIN_INSTRUCTIONS["open_drawer"] == "pull the handle to open the drawer"
    assert eval_sim.CALVIN_INSTRUCTIONS["lift_red_block_drawer"] == "Take the red block from the drawer"  # sic


def test_fnv1_32():
    fnv = eval_sim.fnv1_32
    assert fnv(b"") == 2166136261 and fnv(b"a") == 0x050C5D7E and fnv(b"foobar") == 0x31F0B262  # FNV test vectors
    # pyhash.fnv1_32() as calvin's utils.py calls it starts from 0 and hashes a str as UTF-16-LE: values from a
    # pyhash 0.9.3 build (and 2805756500 is the README's bytes example)
    assert fnv(b"hello world", seed=0) == 2805756500 and fnv(b"a", seed=0) == 97
    assert fnv("hello world".encode("utf-16-le"), seed=0) == 3799943344


def test_reset_state_is_the_official_one():
    # seeds and scene_obs from the official get_env_state_for_initial_condition with a real pyhash build
    assert eval_sim.calvin_reset_seed(FIRST_STATE) == 2138410836
    assert eval_sim.calvin_reset_seed(LAST_STATE) == 1288142433
    robot, scene = eval_sim.calvin_reset_state(FIRST_STATE)
    np.testing.assert_array_equal(scene, [
        0.28, 0.22, 0.0, 0.088, 1.0, 1.0, -0.240851662, 0.0924044687, 0.460990009, 0.0, 0.0, 1.8859410064104645,
        0.229995412, -0.11999514, 0.45999001, 0.0, 0.0, 1.488143437705632, 0.070341633, 0.0924044687, 0.460990009,
        0.0, 0.0, 1.4683986863194542])
    assert robot.shape == (15,) and robot[-1] == 1.0  # the gripper starts open
    again = eval_sim.calvin_reset_state(dict(FIRST_STATE))
    np.testing.assert_array_equal(again[1], scene)


def test_metrics_follow_count_success():
    chain = ("open_drawer", "turn_on_led", "move_slider_left", "lift_red_block_table", "stack_block")
    other = ("close_drawer",) + chain[1:]
    seqs = [({}, chain), ({}, chain), ({}, other), ({}, chain)]
    m = eval_sim.calvin_metrics(seqs, [5, 0, 2, 3])
    assert m["chain_sr"] == {"1": 0.75, "2": 0.75, "3": 0.5, "4": 0.25, "5": 0.25}
    assert m["avg_len"] == pytest.approx(2.5) == pytest.approx(sum(m["chain_sr"].values()))
    assert m["task_info"]["open_drawer"] == {"success": 2, "total": 3}  # chain 2 failed on it
    assert m["task_info"]["close_drawer"] == {"success": 1, "total": 1}
    assert m["task_info"]["turn_on_led"] == {"success": 3, "total": 3}
    assert m["task_info"]["move_slider_left"] == {"success": 2, "total": 3}  # chain 3 stopped there
    assert m["task_info"]["lift_red_block_table"] == {"success": 1, "total": 2}  # chain 3 never got to it
    assert m["task_info"]["stack_block"] == {"success": 1, "total": 1}  # attempted only in chain 1


def test_action_and_observation_conversion():
    a = np.array([0.5, -1.5, 0.1, 0.2, -0.3, 0.4, 0.51], np.float32)
    np.testing.assert_allclose(eval_sim.to_calvin_action(a), [0.5, -1.5, 0.1, 0.2, -0.3, 0.4, 1.0])
    assert eval_sim.to_calvin_action(np.zeros(7))[6] == -1 and eval_sim.to_calvin_action(np.full(7, 0.5))[6] == -1
    obs = StandInEnv({}).get_obs()
    p = eval_sim.calvin_policy_obs(obs)
    assert p["image_primary"].shape == (1, 3, 200, 200) and p["image_primary"].dtype == np.uint8
    assert p["image_wrist"].shape == (1, 3, 84, 84) and p["state"].shape == (1, 15) and p["state"].dtype == np.float32
    np.testing.assert_array_equal(p["image_primary"][0, :, 5, 7], obs["rgb_obs"]["rgb_static"][5, 7])


# --- the rollout loop against a scripted stand-in for calvin_env ------------------------------------------------

class StandInEnv:
    """Test double for calvin_env's PlayTableSimEnv: its 'scene' is the number of steps taken since the last
    reset; it records resets and the actions it receives."""

    def __init__(self, steps_to_solve):
        self.steps_to_solve, self.t, self.resets, self.actions = steps_to_solve, 0, [], []

    def reset(self, robot_obs, scene_obs):
        self.resets.append((robot_obs, scene_obs))
        self.t = 0

    def get_obs(self):
        static = np.zeros((200, 200, 3), np.uint8)
        static[5, 7] = (1, 2, 3)
        return {"rgb_obs": {"rgb_static": static, "rgb_gripper": np.zeros((84, 84, 3), np.uint8)},
                "robot_obs": np.full(15, float(self.t))}

    def get_info(self):
        return {"t": self.t}

    def step(self, action):
        self.actions.append(action)
        self.t += 1
        return self.get_obs(), 0, False, self.get_info()


class StandInOracle:
    """Test double for calvin_env's Tasks: a task is done once it has had its number of steps since its start."""

    def __init__(self, steps_to_solve):
        self.steps_to_solve, self.starts = steps_to_solve, []

    def get_task_info_for_set(self, start_info, end_info, task_filter):
        (task,) = task_filter
        if not self.starts or self.starts[-1] != (task, start_info["t"]):
            self.starts.append((task, start_info["t"]))
        done = end_info["t"] - start_info["t"] >= self.steps_to_solve.get(task, float("inf"))
        return {task} if done else set()


class RecordingPolicy:
    def __init__(self):
        self.resets, self.instructions, self.states = [], [], []

    def reset(self, num_envs):
        self.resets.append(num_envs)

    def act(self, obs, instructions):
        self.instructions.append(instructions[0])
        self.states.append(float(obs["state"][0, 0]))
        return np.array([[0.1, 0, 0, 0, 0, 0, 0.9]], np.float32)


def test_rollout_loop_success_failure_and_no_reset_between_subtasks():
    solve = {"open_drawer": 3, "turn_on_led": 2, "move_slider_left": 4}  # the 4th task is never solved
    chain = ("open_drawer", "turn_on_led", "move_slider_left", "lift_red_block_table", "stack_block")
    env, oracle, policy = StandInEnv(solve), StandInOracle(solve), RecordingPolicy()
    done = eval_sim.run_calvin(env, oracle, policy, [(FIRST_STATE, chain), (FIRST_STATE, chain[1:] + chain[:1])],
                               ep_len=10, method="recording")
    assert done == [3, 2]  # chain 1 stops at lift_red_block_table; chain 2 starts turn_on_led, move_slider_left
    assert len(env.resets) == 2  # one reset per chain, none between subtasks
    np.testing.assert_array_equal(env.resets[0][1], eval_sim.calvin_reset_state(FIRST_STATE)[1])
    # subtasks start where the previous one ended: steps 0, 3, 5, then the failure runs all 10 steps
    assert oracle.starts[:4] == [("open_drawer", 0), ("turn_on_led", 3), ("move_slider_left", 5),
                                 ("lift_red_block_table", 9)]
    assert len(env.actions) == 3 + 2 + 4 + 10 + 2 + 4 + 10
    assert policy.resets == [1] * 7  # before every subtask
    assert policy.instructions[:3] == [eval_sim.CALVIN_INSTRUCTIONS["open_drawer"]] * 3
    assert policy.states[:4] == [0, 1, 2, 3]  # the policy sees the scene continue into the next subtask
    np.testing.assert_allclose(env.actions[0], [0.1, 0, 0, 0, 0, 0, 1.0])  # gripper 0.9 -> +1 open
    m = eval_sim.calvin_metrics([(FIRST_STATE, chain)] * 2, done)
    assert m["avg_len"] == 2.5 and m["chain_sr"]["3"] == 0.5


def test_bad_policy_action_is_one_clear_error():
    class Bad(RecordingPolicy):
        def act(self, obs, instructions):
            return np.zeros((1, 4), np.float32)
    with pytest.raises(EvalError, match=r"policy 'bad': act\(\) returned an array of shape \(1, 4\)"):
        eval_sim.run_calvin(StandInEnv({}), StandInOracle({}), Bad(), [(FIRST_STATE, ("open_drawer",))], 5, "bad")


# --- the command line and the simulator it needs ----------------------------------------------------------------

def test_cli_errors_name_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="eval_sim.py: --num_sequences 0: expected at least 1"):
        eval_sim.main(["evaluate", "--suite", "calvin", "--policy", "random", "--num_sequences", "0"])
    with pytest.raises(SystemExit, match="eval_sim.py: --ep_len -3: expected at least 1"):
        eval_sim.main(["evaluate", "--suite", "calvin", "--policy", "random", "--ep_len", "-3"])
    with pytest.raises(SystemExit, match="--policy expert: CALVIN has no scripted expert"):
        eval_sim.main(["evaluate", "--suite", "calvin", "--policy", "expert", "--calvin_data", str(tmp_path)])
    with pytest.raises(SystemExit, match="--calvin_data: required with --suite calvin.*git clone"):
        eval_sim.main(["evaluate", "--suite", "calvin", "--policy", "random"])


@pytest.mark.skipif(importlib.util.find_spec("calvin_env") is not None, reason="calvin_env is installed here")
def test_missing_calvin_env_says_how_to_install(tmp_path):
    with pytest.raises(SystemExit) as e:
        eval_sim.main(["evaluate", "--suite", "calvin", "--policy", "random", "--calvin_data", str(tmp_path)])
    message = str(e.value)
    for part in ("git clone --recursive https://github.com/mees/calvin_env", eval_sim.CALVIN_ENV_FIX,
                 "pip install -e", "--calvin_data", "validation/.hydra/merged_config.yaml"):
        assert part in message


def test_calvin_data_folder(tmp_path):
    (tmp_path / "validation" / ".hydra").mkdir(parents=True)
    (tmp_path / "validation" / ".hydra" / "merged_config.yaml").write_text("env: {}\n")
    assert eval_sim.calvin_validation_folder(str(tmp_path)) == str(tmp_path / "validation")
    assert eval_sim.calvin_validation_folder(str(tmp_path / "validation")) == str(tmp_path / "validation")
    with pytest.raises(EvalError, match=r"--calvin_data .*nowhere: no validation/.hydra/merged_config.yaml"):
        eval_sim.calvin_validation_folder(str(tmp_path / "nowhere"))
    assert eval_sim.calvin_env_commit(str(tmp_path)) == "unknown"  # not a git checkout: nothing to check
