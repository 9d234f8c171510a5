#!/usr/bin/env python3
"""Validates the infrastructure: the CloudFormation template with cfn-lint, and every state
machine (ASL) with the Amazon States Language schema that cfn-lint ships (the one it checks
inline definitions with), plus the structure the schema cannot express: every transition names
a state, every state is reachable, every non-terminal state goes on, task heartbeats are shorter
than their timeouts, and the ${...} placeholders match the template's DefinitionSubstitutions.

Usage: batch/validate.py [TEMPLATE]  (needs cfn-lint: pip install cfn-lint)"""

import json
import pathlib
import re
import subprocess
import sys

import cfnlint.data.schemas.other.step_functions as sfn_schemas
import jsonschema
import yaml

HERE = pathlib.Path(__file__).resolve().parent
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def cfn_loader():
    """A YAML loader that accepts CloudFormation's short-form tags (!Ref, !Sub...)."""

    class Loader(yaml.SafeLoader):
        pass

    def tag(loader, suffix, node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {suffix: value}

    Loader.add_multi_constructor("!", tag)
    return Loader


def transitions(state):
    """The states a state can go to."""
    targets = [state.get("Next"), state.get("Default")]
    targets += [c.get("Next") for c in state.get("Choices", [])]
    targets += [c.get("Next") for c in state.get("Catch", [])]
    return [t for t in targets if t]


def check_states(machine, where, errors):
    states = machine["States"]
    if machine["StartAt"] not in states:
        errors.append(f"{where}: StartAt {machine['StartAt']!r} is not a state")
    seen, todo = set(), [machine["StartAt"]]
    while todo:
        name = todo.pop()
        if name in seen or name not in states:
            continue
        seen.add(name)
        todo += transitions(states[name])
    for name, state in states.items():
        here = f"{where}.{name}"
        if name not in seen:
            errors.append(f"{here}: unreachable")
        for target in transitions(state):
            if target not in states:
                errors.append(f"{here}: goes to {target!r}, which is not a state")
        terminal = state["Type"] in ("Succeed", "Fail", "Choice") or state.get("End")
        if not terminal and "Next" not in state:
            errors.append(f"{here}: neither Next nor End")
        hb, timeout = state.get("HeartbeatSeconds"), state.get("TimeoutSeconds")
        if hb is not None and timeout is not None and hb >= timeout:
            errors.append(f"{here}: HeartbeatSeconds {hb} >= TimeoutSeconds {timeout}")
        for nested in ("ItemProcessor", "Iterator"):
            if nested in state:
                check_states(state[nested], f"{here}.{nested}", errors)
        for i, branch in enumerate(state.get("Branches", [])):
            check_states(branch, f"{here}.Branches[{i}]", errors)


def main():
    template_path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "cuboids.yaml"
    lint = subprocess.run(
        [sys.executable, "-c", "import sys, cfnlint.runner; sys.exit(cfnlint.runner.main())", str(template_path)]
    )
    errors = [] if lint.returncode == 0 else [f"cfn-lint found problems in {template_path}"]

    template = yaml.load(template_path.read_text(), Loader=cfn_loader())
    schema = json.loads(
        pathlib.Path(sfn_schemas.__file__).with_name("statemachine.json").read_text()
    )
    machines = {
        name: res["Properties"]
        for name, res in template["Resources"].items()
        if res["Type"] == "AWS::StepFunctions::StateMachine"
    }
    checked = set()
    for name, props in machines.items():
        key = props["DefinitionS3Location"]["Key"]
        key = key.get("Sub", key) if isinstance(key, dict) else key
        path = HERE / "statemachines" / key.rsplit("}", 1)[-1]
        checked.add(path.name)
        if not path.exists():
            errors.append(f"{name}: {path} does not exist")
            continue
        text = path.read_text()
        used = set(PLACEHOLDER.findall(text))
        given = set(props.get("DefinitionSubstitutions", {}))
        if used != given:
            errors.append(
                f"{path.name}: placeholders {sorted(used)} but {name} substitutes {sorted(given)}"
            )
        definition = json.loads(
            PLACEHOLDER.sub(lambda m: f"arn:aws:states:us-east-1:123456789012:activity:{m[1]}", text)
        )
        # Draft 2020-12: the schema puts keywords beside "$ref", which Draft 7 would ignore.
        found = list(jsonschema.Draft202012Validator(schema).iter_errors(definition))
        for e in found:
            errors.append(f"{path.name}: {'/'.join(map(str, e.path))}: {e.message}")
        if not found:
            check_states(definition, path.name, errors)
    for path in (HERE / "statemachines").glob("*.asl.json"):
        if path.name not in checked:
            errors.append(f"{path.name}: no state machine in {template_path.name} uses it")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"{template_path.name}: {len(machines)} state machines checked, {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
