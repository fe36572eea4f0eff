/**
 * The `data.pkl` of a PyTorch checkpoint (`torch.save(model.state_dict())`), read by a restricted unpickler
 * in plain TypeScript: it builds dicts, lists, tuples, strings and numbers, and admits only the few globals
 * that a state dict of tensors names (as `torch.load(weights_only=True)` does). Nothing is ever called;
 * any other global is refused, naming it and its byte offset. The result maps each name to a view into a
 * storage (`data/<key>` in the archive), which `torch_zip.ts` streams.
 * @module
 */

import type { SafetensorsDtype } from "./safetensors.ts";

/** One tensor of the state dict: a strided view into a storage. */
export interface TorchTensorRef {
  /** The storage's key: its bytes are the archive's `data/<key>` record. */
  storage: string;
  /** Element type (the storage's), in safetensors' names. */
  dtype: SafetensorsDtype;
  /** Dimensions. */
  shape: number[];
  /** Elements to step per dimension. */
  strides: number[];
  /** First element within the storage. */
  offset: number;
  /** Whether its values are the storage's negated (the neg bit: metadata `{"neg": True}`, as a
   * `torch._neg_view` saves); absent where not. Only float tensors have it (others are refused). */
  neg?: true;
}

/** Number of elements of a view. */
export function viewCount(r: TorchTensorRef): number {
  return r.shape.reduce((a, b) => a * b, 1);
}

/** Elements of the storage from a view's first to one past its last (0 for an empty view). */
export function viewExtent(r: TorchTensorRef): number {
  return viewCount(r) === 0 ? 0 : r.shape.reduce((a, d, i) => a + (d - 1) * r.strides[i], 0) + 1;
}

/** Whether a view's elements lie back to back in row-major order (dimensions of size 1 step anything). */
export function isContiguous(r: TorchTensorRef): boolean {
  return r.shape.every((d, i) => d === 1 || r.strides[i] === r.shape.slice(i + 1).reduce((a, b) => a * b, 1));
}

/** A key equal for the same view of the same storage (a tied weight saved under two names). */
export function viewKey(r: TorchTensorRef): string {
  return `${r.storage}|${r.offset}|${r.shape}|${r.strides}${r.neg ? "|neg" : ""}`;
}

/** A storage that tensors view: its element type and count. */
export interface TorchStorage {
  /** Element type. */
  dtype: SafetensorsDtype;
  /** Number of elements (the `data/<key>` record holds this many times the element's size in bytes). */
  numel: number;
}

/** What `data.pkl` holds: tensors by name (in the pickle's order) and the storages they view. */
export interface TorchStateDict {
  /** Tensors by name. */
  tensors: Map<string, TorchTensorRef>;
  /** Storages by key. */
  storages: Map<string, TorchStorage>;
}

// torch's storage classes, by the element type they hold (and its size in bytes).
const STORAGE_DTYPES: Record<string, SafetensorsDtype> = {
  FloatStorage: "F32",
  HalfStorage: "F16",
  BFloat16Storage: "BF16",
  DoubleStorage: "F64",
  LongStorage: "I64",
  IntStorage: "I32",
  ShortStorage: "I16",
  CharStorage: "I8",
  ByteStorage: "U8",
  BoolStorage: "BOOL",
};

const FLOATS = new Set<SafetensorsDtype>(["F32", "F16", "BF16", "F64"]);

const READ_STORAGES = Object.keys(STORAGE_DTYPES).join(", ");

/** Bytes per element of each dtype a storage can hold. */
export const DTYPE_BYTES: Record<SafetensorsDtype, number> = {
  F32: 4,
  F16: 2,
  BF16: 2,
  F64: 8,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

// Values on the unpickler's stack. Dicts are Maps, lists arrays, tuples frozen arrays.
class Global {
  constructor(readonly module: string, readonly name: string) {}
}
class StorageType {
  constructor(readonly dtype: SafetensorsDtype) {}
}
class Mark {}
class StorageRef {
  constructor(readonly key: string) {}
}
class TensorValue {
  // `unread`: why it is refused once its name is known (metadata that is not applied)
  constructor(readonly ref: TorchTensorRef, readonly unread: string | null) {}
}
type Value = unknown;

// The globals a state dict names, and what each becomes when called (REDUCE) with its arguments.
const CALLABLE = new Set([
  "collections.OrderedDict",
  "torch._utils._rebuild_tensor_v2",
  "torch._utils._rebuild_parameter",
  "torch._utils._rebuild_parameter_with_state",
]);

// Values the unpickler may push or memoize (dicts, lists, tuples, marks, strings, tensors, numbers, memo
// entries): one opcode byte makes a dict of ~200 bytes, so a 32 MiB pickle of EMPTY_DICT exhausted memory. A
// state dict makes 30 to 40 per tensor (torch.save's, measured), so this admits some 50000 tensors.
export const MAX_PICKLE_VALUES = 2 ** 21;

const isInt = (v: Value): v is number => typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
const isIntTuple = (v: Value): v is number[] => Array.isArray(v) && v.every(isInt);

/** Reads `data.pkl`'s bytes into a {@linkcode TorchStateDict}; `where` names the file in errors. */
export function parseTorchPickle(bytes: Uint8Array, where: string): TorchStateDict {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const storages = new Map<string, TorchStorage>();
  const fail = (at: number, why: string): never => {
    throw new Error(`${where}: byte ${at} of the pickle: ${why}`);
  };
  let pos = 0;
  const need = (n: number, at: number) => {
    if (pos + n > bytes.length) fail(at, `it ends inside an instruction (wanted ${n} bytes at ${pos})`);
  };
  const u8 = (at: number) => (need(1, at), bytes[pos++]);
  const u16 = (at: number) => (need(2, at), pos += 2, view.getUint16(pos - 2, true));
  const u32 = (at: number) => (need(4, at), pos += 4, view.getUint32(pos - 4, true));
  const take = (n: number, at: number) => (need(n, at), pos += n, bytes.subarray(pos - n, pos));
  const text = (n: number, at: number) => {
    try {
      return new TextDecoder("utf-8", { fatal: true }).decode(take(n, at));
    } catch (e) {
      if (e instanceof TypeError) fail(at, "a string that is not valid UTF-8");
      throw e;
    }
  };
  const line = (at: number) => {
    const end = bytes.indexOf(10, pos);
    if (end < 0) fail(at, "a GLOBAL without its newline");
    const s = new TextDecoder().decode(bytes.subarray(pos, end));
    pos = end + 1;
    return s;
  };

  const stack: Value[] = [];
  const memo = new Map<number, Value>();
  let made = 0;
  const count = (at: number) => {
    if (++made > MAX_PICKLE_VALUES) {
      fail(at, `it makes over ${MAX_PICKLE_VALUES} values (a state dict makes 30 to 40 per tensor): refused`);
    }
  };
  // pushes a value the opcode at `at` made
  const push = (v: Value, at: number) => (count(at), stack.push(v));
  const remember = (i: number, at: number) => (count(at), memo.set(i, top(at)));
  const pop = (at: number): Value => (stack.length ? stack.pop() : fail(at, "the stack is empty"));
  const popMark = (at: number): Value[] => {
    let i = stack.length - 1;
    while (i >= 0 && !(stack[i] instanceof Mark)) i--;
    if (i < 0) fail(at, "no MARK on the stack");
    const items = stack.splice(i);
    return items.slice(1);
  };
  const top = (
    at: number,
  ): Value => (stack.length ? stack[stack.length - 1] : fail(at, "the stack is empty"));

  const global = (module: string, name: string, at: number): Value => {
    // own keys only: `in` also found Object.prototype's (torch.constructor was taken for a storage type)
    if (module === "torch" && Object.hasOwn(STORAGE_DTYPES, name)) {
      return new StorageType(STORAGE_DTYPES[name]);
    }
    if (CALLABLE.has(`${module}.${name}`)) return new Global(module, name);
    // tensors a state dict may hold that are not read: say so rather than that the file is no state dict
    if (module === "torch" && name.endsWith("Storage")) {
      return fail(
        at,
        `torch.${name}: a storage of an element type that is not read (read: ${READ_STORAGES})`,
      );
    }
    if (module === "torch._utils" && name === "_rebuild_tensor_v3") { // its 7th argument: the dtype
      return fail(
        at,
        "torch._utils._rebuild_tensor_v3: a tensor of an element type without a storage class (uint16, uint32, " +
          `uint64, float8, ...: PyTorch 2.3+ saves those with it), which is not read (read: ${READ_STORAGES})`,
      );
    }
    if (module === "torch._utils" && name.startsWith("_rebuild_")) {
      return fail(
        at,
        `torch._utils.${name}: a kind of tensor that is not read (quantized, sparse, ...; only dense ones are)`,
      );
    }
    return fail(
      at,
      `it refers to ${module}.${name}, which a state dict of tensors does not need: refused (only dicts, ` +
        `tensors and torch's storage types are read; nothing in the file is run)`,
    );
  };

  // A tensor's arguments, checked: storage, offset, size, stride, requires_grad, hooks[, metadata].
  const rebuildTensor = (args: Value[], at: number): TensorValue => {
    const [storage, offset, shape, strides, , , metadata] = args;
    if (!(storage instanceof StorageRef)) return fail(at, "a tensor without its storage");
    const key = storage.key;
    if (!isInt(offset) || !isIntTuple(shape) || !isIntTuple(strides) || shape.length !== strides.length) {
      fail(at, `a tensor of storage ${key} with a bad offset, size or stride`);
    }
    const s = storages.get(key)!;
    const r: TorchTensorRef = {
      storage: key,
      dtype: s.dtype,
      shape: shape as number[],
      strides: strides as number[],
      offset: offset as number,
    };
    // torch.load's set_tensor_metadata: the neg bit negates the values; the conj bit is the identity on real
    // numbers (only real dtypes are read). Any other bit, or neg on an integer tensor, is refused by name.
    if (metadata != null && !(metadata instanceof Map)) {
      fail(at, `a tensor of storage ${key} with metadata not a dict`);
    }
    const bits = [...(metadata as Map<Value, Value> | null) ?? []];
    if (bits.some(([k, v]) => typeof k !== "string" || typeof v !== "boolean")) {
      fail(at, `a tensor of storage ${key} with metadata not of names and booleans`);
    }
    const set = bits.filter(([, v]) => v).map(([k]) => k as string);
    if (set.includes("neg")) r.neg = true;
    const unread = set.filter((k) => k !== "conj" && (k !== "neg" || !FLOATS.has(r.dtype)));
    const bad = `${unread.join(", ")} (on ${r.dtype})`;
    const why = unread.length
      ? `byte ${at} of the pickle: its metadata sets ${bad}, which is not applied (read: neg on float ` +
        `tensors; conj, the identity on real ones)`
      : null;
    const last = viewExtent(r) === 0 ? 0 : r.offset + viewExtent(r);
    if (last > s.numel) {
      fail(
        at,
        `a tensor of size (${r.shape.join(", ")}), stride (${r.strides.join(", ")}) at offset ${r.offset} ` +
          `reaches element ${last} of storage ${key}, which has ${s.numel}`,
      );
    }
    return new TensorValue(r, why);
  };

  const call = (fn: Value, args: Value, at: number): Value => {
    if (!(fn instanceof Global) || !Array.isArray(args)) return fail(at, "REDUCE of something not callable");
    switch (`${fn.module}.${fn.name}`) {
      case "collections.OrderedDict": // a state dict's items come by SETITEMS; any here would be lost
        return args.length ? fail(at, "OrderedDict called with arguments") : new Map();
      case "torch._utils._rebuild_tensor_v2":
        return rebuildTensor(args, at);
      default: // _rebuild_parameter(data, requires_grad, hooks[, state]): the tensor it wraps
        return args[0];
    }
  };

  // A storage's persistent id: ('storage', type, key, location, numel).
  const persistent = (pid: Value, at: number): Value => {
    if (!Array.isArray(pid) || pid[0] !== "storage" || pid.length !== 5) {
      return fail(at, "a persistent id that is not a storage");
    }
    const [, type, key, , numel] = pid;
    if (!(type instanceof StorageType) || typeof key !== "string" || !isInt(numel)) {
      return fail(at, "a storage id without its type, key or size");
    }
    const known = storages.get(key);
    if (known && (known.dtype !== type.dtype || known.numel !== numel)) {
      fail(at, `storage ${key} named as ${type.dtype} x ${numel} and as ${known.dtype} x ${known.numel}`);
    }
    storages.set(key, { dtype: type.dtype, numel });
    return new StorageRef(key);
  };

  const setItems = (d: Value, items: Value[], at: number) => {
    if (!(d instanceof Map)) fail(at, "SETITEM(S) on something that is not a dict");
    if (items.length % 2) {
      fail(at, `an odd number of items (${items.length}) for a dict's keys and values (Python raises)`);
    }
    for (let i = 0; i + 1 < items.length; i += 2) (d as Map<Value, Value>).set(items[i], items[i + 1]);
  };

  for (;;) {
    const at = pos;
    const op = u8(at);
    switch (op) {
      case 0x80: // PROTO
        if (u8(at) > 5) fail(at, "pickle protocol above 5");
        break;
      case 0x95: // FRAME: a length prefix; the opcodes go on inline
        take(8, at);
        break;
      case 0x2e: { // STOP
        const result = pop(at);
        return { tensors: stateDictOf(result, where), storages };
      }
      case 0x28: // MARK
        push(new Mark(), at);
        break;
      case 0x7d: // EMPTY_DICT
        push(new Map(), at);
        break;
      case 0x5d: // EMPTY_LIST
        push([], at);
        break;
      case 0x29: // EMPTY_TUPLE
        push(Object.freeze([]), at);
        break;
      case 0x74: // TUPLE
        push(Object.freeze(popMark(at)), at);
        break;
      case 0x85: // TUPLE1
      case 0x86: // TUPLE2
      case 0x87: { // TUPLE3
        const n = op - 0x84;
        if (stack.length < n) fail(at, "the stack is empty");
        push(Object.freeze(stack.splice(stack.length - n)), at);
        break;
      }
      case 0x6c: // LIST
        push(popMark(at), at);
        break;
      case 0x64: { // DICT
        const d = new Map();
        setItems(d, popMark(at), at);
        push(d, at);
        break;
      }
      case 0x58: // BINUNICODE
        push(text(u32(at), at), at);
        break;
      case 0x8c: // SHORT_BINUNICODE
        push(text(u8(at), at), at);
        break;
      case 0x55: // SHORT_BINSTRING
        push(new TextDecoder("latin1").decode(take(u8(at), at)), at);
        break;
      case 0x54: // BINSTRING
        push(new TextDecoder("latin1").decode(take(u32(at), at)), at);
        break;
      case 0x4b: // BININT1
        push(u8(at), at);
        break;
      case 0x4d: // BININT2
        push(u16(at), at);
        break;
      case 0x4a: // BININT
        push(u32(at) | 0, at);
        break;
      case 0x8a: { // LONG1: little-endian two's complement
        const b = take(u8(at), at);
        let v = 0n;
        for (let i = b.length - 1; i >= 0; i--) v = (v << 8n) | BigInt(b[i]);
        if (b.length && b[b.length - 1] & 0x80) v -= 1n << BigInt(8 * b.length);
        if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < -BigInt(Number.MAX_SAFE_INTEGER)) {
          fail(at, `the integer ${v} is out of range`);
        }
        push(Number(v), at);
        break;
      }
      case 0x47: // BINFLOAT (big-endian)
        need(8, at);
        push(view.getFloat64(pos, false), at);
        pos += 8;
        break;
      case 0x4e: // NONE
        push(null, at);
        break;
      case 0x88: // NEWTRUE
      case 0x89: // NEWFALSE
        push(op === 0x88, at);
        break;
      case 0x71: // BINPUT
        remember(u8(at), at);
        break;
      case 0x72: // LONG_BINPUT
        remember(u32(at), at);
        break;
      case 0x94: // MEMOIZE
        remember(memo.size, at);
        break;
      case 0x68: // BINGET
      case 0x6a: { // LONG_BINGET
        const i = op === 0x68 ? u8(at) : u32(at);
        if (!memo.has(i)) fail(at, `memo ${i} was never stored`);
        push(memo.get(i), at);
        break;
      }
      case 0x63: { // GLOBAL
        const module = line(at);
        push(global(module, line(at), at), at);
        break;
      }
      case 0x93: { // STACK_GLOBAL
        const name = pop(at);
        const module = pop(at);
        if (typeof module !== "string" || typeof name !== "string") fail(at, "STACK_GLOBAL without names");
        push(global(module as string, name as string, at), at);
        break;
      }
      case 0x52: { // REDUCE
        const args = pop(at);
        push(call(pop(at), args, at), at);
        break;
      }
      case 0x81: { // NEWOBJ: cls.__new__(cls, *args), as REDUCE for the admitted globals
        const args = pop(at);
        push(call(pop(at), args, at), at);
        break;
      }
      case 0x62: // BUILD: the state of an OrderedDict (state_dict's _metadata) is not needed
        pop(at);
        if (!(top(at) instanceof Map)) fail(at, "BUILD on something that is not a dict");
        break;
      case 0x51: // BINPERSID
        push(persistent(pop(at), at), at);
        break;
      case 0x73: { // SETITEM
        const v = pop(at);
        const k = pop(at);
        setItems(top(at), [k, v], at);
        break;
      }
      case 0x75: { // SETITEMS
        const items = popMark(at);
        setItems(top(at), items, at);
        break;
      }
      case 0x61: { // APPEND
        const v = pop(at);
        const l = top(at);
        if (!Array.isArray(l) || Object.isFrozen(l)) fail(at, "APPEND to something that is not a list");
        (l as Value[]).push(v);
        break;
      }
      case 0x65: { // APPENDS
        const items = popMark(at);
        const l = top(at);
        if (!Array.isArray(l) || Object.isFrozen(l)) fail(at, "APPENDS to something that is not a list");
        for (const v of items) (l as Value[]).push(v); // push(...items) overflows the stack on many
        break;
      }
      case 0x30: // POP
        pop(at);
        break;
      case 0x31: // POP_MARK
        popMark(at);
        break;
      case 0x32: // DUP
        push(top(at), at);
        break;
      default:
        fail(at, `opcode 0x${op.toString(16).padStart(2, "0")} is not one a state dict needs`);
    }
  }
}

// The top-level object must be a dict of name -> tensor.
function stateDictOf(result: Value, where: string): Map<string, TorchTensorRef> {
  if (!(result instanceof Map)) {
    throw new Error(`${where}: the pickle holds ${kindOf(result)}, not a state dict (a dict of tensors)`);
  }
  const tensors = new Map<string, TorchTensorRef>();
  for (const [k, v] of result) {
    if (typeof k !== "string") throw new Error(`${where}: the state dict has a key that is not a string`);
    if (!(v instanceof TensorValue)) {
      const hint = v instanceof Map ? " (a training checkpoint? save its model's state_dict() alone)" : "";
      throw new Error(`${where}: '${k}' is ${kindOf(v)}, not a tensor${hint}`);
    }
    if (v.unread) throw new Error(`${where}: tensor '${k}': ${v.unread}: refused`);
    tensors.set(k, v.ref);
  }
  return tensors;
}

const kindOf = (v: Value): string =>
  v instanceof Map
    ? "a dict"
    : Array.isArray(v)
    ? (Object.isFrozen(v) ? "a tuple" : "a list")
    : v === null
    ? "None"
    : typeof v === "object"
    ? "an object"
    : `a ${typeof v}`;
