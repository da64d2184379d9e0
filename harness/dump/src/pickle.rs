//! The pickle that `torch.save` writes for one tensor (`<archive>/data.pkl`), read by a
//! small, bounded interpreter of only the opcodes and globals that pickle uses.
//!
//! `torch.save(t)` (protocol 2) pickles `torch._utils._rebuild_tensor_v2(storage,
//! offset, size, stride, requires_grad, OrderedDict())`, the storage being the persistent
//! ID `('storage', torch.<Dtype>Storage, key, location, numel)`. This reader knows those
//! opcodes (PROTO, GLOBAL, MARK, the tuple, list and dict builders, the integer, float,
//! string and bool pushers, the memo, BINPERSID, REDUCE, STOP) and those globals
//! (`_rebuild_tensor_v2`, `OrderedDict`, the storage classes); anything else is refused
//! by name and offset, so nothing is ever called. It allocates within fixed bounds:
//!
//! * the pickle is at most [`MAX_PICKLE_BYTES`] (a tensor's is about 170 bytes);
//! * no object nests deeper than [`MAX_DEPTH`] (the tensor's nests 3 deep), so neither
//!   building nor dropping an object recurses far;
//! * every object built or copied out of the memo counts against [`MAX_NODES`], so a
//!   memo that doubles an object at each step (a "memo bomb") stops at the budget.

/// The largest `data.pkl` read.
pub const MAX_PICKLE_BYTES: usize = 1 << 20;
/// The deepest nesting of tuples, lists and dicts.
pub const MAX_DEPTH: u32 = 32;
/// The most objects built, memo copies included.
pub const MAX_NODES: usize = 1 << 16;

/// A pickled value of the kinds a saved tensor uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A global this reader knows: `module name`.
    Global(&'static str, &'static str),
    /// `_rebuild_tensor_v2(args)`.
    Rebuild(Vec<Value>),
    /// A persistent ID (torch's storage reference).
    Persistent(Box<Value>),
}

/// The globals a saved tensor names; any other is refused.
const GLOBALS: &[(&str, &str)] = &[
    ("torch._utils", "_rebuild_tensor_v2"),
    ("collections", "OrderedDict"),
    ("torch", "DoubleStorage"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// What the pickle of a saved tensor says: the storage and the strided view of it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The storage class's name, e.g. `FloatStorage`.
    pub storage_class: &'static str,
    /// The storage's key: its bytes are `<archive>/data/<key>`.
    pub key: String,
    /// The storage's length in elements.
    pub storage_numel: usize,
    /// The view's first element, in elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// One stack entry: a value with its nesting depth and its count of objects.
#[derive(Clone)]
struct Item {
    value: Value,
    depth: u32,
    nodes: usize,
}

enum Entry {
    Mark,
    Item(Item),
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Entry>,
    memo: std::collections::HashMap<u32, Item>,
    nodes: usize,
}

/// Reads the pickle `bytes` of one saved tensor.
pub fn tensor_info(bytes: &[u8]) -> Result<TensorInfo, String> {
    let value = load(bytes)?;
    rebuild_args(value)
}

/// Runs the pickle `bytes` and returns the object it leaves.
pub fn load(bytes: &[u8]) -> Result<Value, String> {
    if bytes.len() > MAX_PICKLE_BYTES {
        return Err(format!("{} bytes: more than the {MAX_PICKLE_BYTES} read", bytes.len()));
    }
    let mut m = Machine { bytes, pos: 0, stack: Vec::new(), memo: Default::default(), nodes: 0 };
    loop {
        let at = m.pos;
        let op = m.take(1).map_err(|e| format!("offset {at}: {e}"))?[0];
        match m.step(op) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("offset {at}: {e}")),
        }
    }
    match (m.stack.pop(), m.stack.is_empty()) {
        (Some(Entry::Item(it)), true) => Ok(it.value),
        _ => Err("STOP: the stack does not hold exactly one object".into()),
    }
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or("the pickle ends inside an opcode")?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.bytes[self.pos..];
        let n = rest.iter().take(256).position(|&b| b == b'\n').ok_or("GLOBAL: no newline")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "GLOBAL: not UTF-8")?.to_string();
        self.pos += n + 1;
        Ok(s)
    }

    /// Counts `nodes` new objects against the budget.
    fn spend(&mut self, nodes: usize) -> Result<(), String> {
        self.nodes = self.nodes.saturating_add(nodes);
        if self.nodes > MAX_NODES {
            return Err(format!("more than {MAX_NODES} objects (a memo bomb?)"));
        }
        Ok(())
    }

    fn push(&mut self, value: Value) -> Result<(), String> {
        self.spend(1)?;
        self.stack.push(Entry::Item(Item { value, depth: 0, nodes: 1 }));
        Ok(())
    }

    fn pop(&mut self) -> Result<Item, String> {
        match self.stack.pop() {
            Some(Entry::Item(it)) => Ok(it),
            Some(Entry::Mark) => Err("an object expected, a MARK found".into()),
            None => Err("the stack is empty".into()),
        }
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Item>, String> {
        let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>, _>>()?;
        items.reverse();
        Ok(items)
    }

    fn pop_mark(&mut self) -> Result<Vec<Item>, String> {
        let mark = self.stack.iter().rposition(|e| matches!(e, Entry::Mark));
        let mark = mark.ok_or("no MARK to pop to")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|e| match e {
                Entry::Item(it) => it,
                Entry::Mark => unreachable!("the last MARK was split off"),
            })
            .collect())
    }

    /// Pushes a container of `items`, one level deeper than the deepest of them.
    fn push_nested(
        &mut self,
        items: Vec<Item>,
        make: fn(Vec<Value>) -> Value,
    ) -> Result<(), String> {
        let depth = items.iter().map(|i| i.depth).max().map_or(0, |d| d + 1);
        if depth > MAX_DEPTH {
            return Err(format!("objects nested more than {MAX_DEPTH} deep"));
        }
        let nodes = items.iter().map(|i| i.nodes).sum::<usize>() + 1;
        self.spend(1)?;
        let value = make(items.into_iter().map(|i| i.value).collect());
        self.stack.push(Entry::Item(Item { value, depth, nodes }));
        Ok(())
    }

    /// Adds `items` (a flat list, or key, value pairs) to the list or dict on top.
    fn extend_top(&mut self, items: Vec<Item>, name: &str) -> Result<(), String> {
        let Some(Entry::Item(top)) = self.stack.last_mut() else {
            return Err(format!("{name}: no list or dict below"));
        };
        let depth = items.iter().map(|i| i.depth + 1).max().unwrap_or(0).max(top.depth);
        if depth > MAX_DEPTH {
            return Err(format!("objects nested more than {MAX_DEPTH} deep"));
        }
        top.depth = depth;
        top.nodes += items.iter().map(|i| i.nodes).sum::<usize>();
        match &mut top.value {
            Value::List(l) if name.starts_with("APPEND") => {
                l.extend(items.into_iter().map(|i| i.value))
            }
            Value::Dict(d) if name.starts_with("SETITEM") && items.len().is_multiple_of(2) => {
                let mut it = items.into_iter().map(|i| i.value);
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
            }
            _ => return Err(format!("{name}: not a list or dict, or an odd count")),
        }
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Result<(), String> {
        let it = self.memo.get(&id).ok_or_else(|| format!("memo entry {id} was never put"))?;
        let it = it.clone();
        self.spend(it.nodes)?;
        self.stack.push(Entry::Item(it));
        Ok(())
    }

    fn memo_put(&mut self, id: u32) -> Result<(), String> {
        let Some(Entry::Item(top)) = self.stack.last() else {
            return Err("PUT with no object on the stack".into());
        };
        let top = top.clone();
        self.spend(top.nodes)?;
        self.memo.insert(id, top);
        Ok(())
    }

    /// One opcode; true at STOP.
    fn step(&mut self, op: u8) -> Result<bool, String> {
        match op {
            0x80 => {
                let v = self.u8()?;
                if v > 2 {
                    return Err(format!("pickle protocol {v}: torch.save writes protocol 2"));
                }
            }
            b'.' => return Ok(true),
            b'c' => {
                let (module, name) = (self.line()?, self.line()?);
                let &(m, n) =
                    GLOBALS.iter().find(|(m, n)| *m == module && *n == name).ok_or_else(|| {
                        format!("GLOBAL {module}.{name}: not a global of a saved tensor")
                    })?;
                self.push(Value::Global(m, n))?;
            }
            b'(' => self.stack.push(Entry::Mark),
            b')' => self.push(Value::Tuple(Vec::new()))?,
            b']' => self.push(Value::List(Vec::new()))?,
            b'}' => self.push(Value::Dict(Vec::new()))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push_nested(items, Value::Tuple)?;
            }
            0x85..=0x87 => {
                let items = self.pop_n(usize::from(op - 0x84))?;
                self.push_nested(items, Value::Tuple)?;
            }
            b'a' => {
                let item = self.pop()?;
                self.extend_top(vec![item], "APPEND")?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend_top(items, "APPENDS")?;
            }
            b's' => {
                let items = self.pop_n(2)?;
                self.extend_top(items, "SETITEM")?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.extend_top(items, "SETITEMS")?;
            }
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v.into()))?;
            }
            b'M' => {
                let b = self.take(2)?;
                let v = u16::from_le_bytes([b[0], b[1]]);
                self.push(Value::Int(v.into()))?;
            }
            b'J' => {
                let v = self.u32()? as i32;
                self.push(Value::Int(v.into()))?;
            }
            0x8a => {
                let n = usize::from(self.u8()?);
                if n > 8 {
                    return Err(format!("LONG1 of {n} bytes: larger than 64 bits"));
                }
                let b = self.take(n)?;
                let mut v = [if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xff } else { 0 }; 8];
                v[..n].copy_from_slice(b);
                self.push(Value::Int(i64::from_le_bytes(v)))?;
            }
            b'G' => {
                let b = self.take(8)?;
                let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                self.push(Value::Float(v))?;
            }
            b'X' => {
                let n = self.u32()? as usize;
                let s = std::str::from_utf8(self.take(n)?)
                    .map_err(|_| "BINUNICODE: not UTF-8".to_string())?
                    .to_string();
                self.push(Value::Str(s))?;
            }
            b'q' => {
                let id = self.u8()?;
                self.memo_put(id.into())?;
            }
            b'r' => {
                let id = self.u32()?;
                self.memo_put(id)?;
            }
            b'h' => {
                let id = self.u8()?;
                self.memo_get(id.into())?;
            }
            b'j' => {
                let id = self.u32()?;
                self.memo_get(id)?;
            }
            b'Q' => {
                let id = self.pop()?;
                self.push_nested(vec![id], |mut v| Value::Persistent(Box::new(v.remove(0))))?;
            }
            b'R' => {
                let [callable, args]: [Item; 2] =
                    self.pop_n(2)?.try_into().map_err(|_| "REDUCE: two objects expected")?;
                match (callable.value, args.value) {
                    (Value::Global("collections", "OrderedDict"), Value::Tuple(a))
                        if a.is_empty() =>
                    {
                        self.push(Value::Dict(Vec::new()))?
                    }
                    (Value::Global("torch._utils", "_rebuild_tensor_v2"), Value::Tuple(a)) => {
                        let args = Item { value: Value::Tuple(a), ..args };
                        self.push_nested(vec![args], |mut v| match v.remove(0) {
                            Value::Tuple(a) => Value::Rebuild(a),
                            _ => unreachable!("a tuple was passed"),
                        })?
                    }
                    (c, _) => {
                        return Err(format!(
                            "REDUCE of {}: not a call a saved tensor makes",
                            short(&c)
                        ))
                    }
                }
            }
            other => {
                return Err(format!(
                    "opcode 0x{other:02x} ({:?}): not one torch.save writes for a tensor",
                    other as char
                ))
            }
        }
        Ok(false)
    }
}

/// A value, for messages: a global by name, anything else cut to 40 characters.
fn short(v: &Value) -> String {
    match v {
        Value::Global(m, n) => format!("{m}.{n}"),
        other => format!("{other:?}").chars().take(40).collect(),
    }
}

fn index(v: &Value, what: &str) -> Result<usize, String> {
    match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("{what} {i} is negative")),
        other => Err(format!("{what} is {}, not an integer", short(other))),
    }
}

fn indices(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    match v {
        Value::Tuple(t) => t.iter().map(|x| index(x, what)).collect(),
        other => Err(format!("{what} is {}, not a tuple", short(other))),
    }
}

/// The storage and view out of `_rebuild_tensor_v2(storage, offset, size, stride, ...)`.
fn rebuild_args(value: Value) -> Result<TensorInfo, String> {
    let Value::Rebuild(args) = value else {
        return Err(format!("the pickled object ({}) is not a torch tensor", short(&value)));
    };
    if args.len() < 4 {
        return Err(format!(
            "_rebuild_tensor_v2 takes (storage, offset, size, stride, ...), got {} arguments",
            args.len()
        ));
    }
    let Value::Persistent(id) = &args[0] else {
        return Err("_rebuild_tensor_v2: the storage is not a persistent ID".into());
    };
    let (storage_class, key, storage_numel) = match id.as_ref() {
        Value::Tuple(t) => match t.as_slice() {
            [Value::Str(tag), Value::Global("torch", class), Value::Str(key), _, numel]
                if tag == "storage" =>
            {
                (*class, key.clone(), index(numel, "storage size")?)
            }
            _ => {
                return Err("the storage ID is not ('storage', class, key, location, numel)".into())
            }
        },
        _ => return Err("the storage ID is not a tuple".into()),
    };
    let shape = indices(&args[2], "size")?;
    let stride = indices(&args[3], "stride")?;
    if shape.len() != stride.len() {
        return Err(format!("size {shape:?} and stride {stride:?} differ in length"));
    }
    Ok(TensorInfo {
        storage_class,
        key,
        storage_numel,
        offset: index(&args[1], "storage offset")?,
        shape,
        stride,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `torch.save(torch.zeros(2, 3))` writes (protocol 2), as bytes.
    fn saved_tensor() -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x00((X\x07\x00\x00\x00storage");
        p.extend(b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06t");
        p.extend(b"QK\x00K\x02K\x03\x86K\x03K\x01\x86\x89ccollections\nOrderedDict\n)Rtq\x01R.");
        p
    }

    #[test]
    fn a_saved_tensor_reads_back_its_storage_and_view() {
        let info = tensor_info(&saved_tensor()).unwrap();
        assert_eq!(info.storage_class, "FloatStorage");
        assert_eq!(info.key, "0");
        assert_eq!((info.storage_numel, info.offset), (6, 0));
        assert_eq!((info.shape, info.stride), (vec![2, 3], vec![3, 1]));
    }

    #[test]
    fn every_truncation_of_a_saved_tensor_is_an_error_not_a_panic() {
        let p = saved_tensor();
        for n in 0..p.len() {
            assert!(tensor_info(&p[..n]).is_err(), "{n} bytes");
        }
    }

    #[test]
    fn nesting_past_the_depth_bound_is_refused() {
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.push(b'.');
        let e = load(&p).unwrap_err();
        assert!(e.contains("nested more than"), "{e}");
    }

    #[test]
    fn a_memo_bomb_stops_at_the_object_budget() {
        // Each round: get the last object twice, pair them, put the pair back.
        let mut p = vec![0x80, 2, b')', b'q', 0];
        for _ in 0..30 {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        let e = load(&p).unwrap_err();
        assert!(e.contains("objects"), "{e}");
    }

    #[test]
    fn globals_and_calls_outside_a_saved_tensor_are_refused() {
        let e = load(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.").unwrap_err();
        assert!(e.contains("os.system"), "{e}");
        let e = load(b"\x80\x04\x95").unwrap_err();
        assert!(e.contains("protocol 4"), "{e}");
        let e = load(b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R.").unwrap_err();
        assert!(e.contains("OrderedDict"), "{e}");
    }
}
