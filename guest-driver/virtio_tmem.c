// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_tmem: a synchronous swap block device backed by host memory.
 *
 * Each virtio device with ID 63 becomes one block device /dev/tmemN. A write
 * of a 4 KiB page is a PUT (or PUT_FILL when every 64-bit word of the page is
 * the same), a read is a GET, discard/write-zeroes and the swap layer's
 * slot-free notification are INVALIDATE_PAGE. Reads and writes are
 * synchronous: the submitter polls the used ring for a short while and then
 * sleeps until the interrupt. The wire format is in virtio_tmem.h and
 * docs/protocol.md.
 *
 * Queues: each queue has one spinlock covering virtqueue_add_sgs, the kick,
 * virtqueue_get_buf and the interrupt callback. It has one synchronous
 * request slot (preallocated header and status) that a submitter claims
 * before it posts, and a set of invalidation buffers that slot-free
 * notifications post into without waiting; their completions are reaped by
 * whoever looks at the queue next (a polling submitter or the interrupt).
 *
 * Slot-free invalidations and PUTs: the notify clears the slot's in_host
 * bit and sets its inval_busy bit before it posts; the completion clears
 * inval_busy. A notify that finds no free buffer sets inval_pending and
 * leaves the slot to a worker that posts it once a buffer comes free. A PUT
 * to a slot whose inval_busy bit is set takes back a pending invalidation
 * (the PUT replaces the old copy anyway) or waits for the posted one, so an
 * INVALIDATE can never overtake the PUT of a reused slot on another queue
 * (queues are not ordered, protocol 4.4).
 *
 * Suspend and hibernation: a reset of the device drops every page it holds,
 * and virtio resets the device on resume. So tmem_freeze() refuses (-EBUSY)
 * while the host holds any page the guest may read back; with none held it
 * quiesces, resets and deletes the queues, and tmem_restore() creates them
 * again.
 */

#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/blkdev.h>
#include <linux/bio.h>
#include <linux/highmem.h>
#include <linux/pagemap.h>
#include <linux/scatterlist.h>
#include <linux/completion.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <linux/idr.h>
#include <linux/bitmap.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/ktime.h>
#include <linux/delay.h>

#include "virtio_tmem.h"
#include "compat.h"

/* A status byte the device has not written (it never sends this value). */
#define TMEM_S_NONE		0xff

/*
 * Swap cannot address more pages than this on one device (the bitmap helpers
 * count bits in an unsigned int); a larger capacity is clamped.
 */
#define TMEM_MAX_PAGES		BIT_ULL(31)

/* Invalidation buffers per queue (at most, see tmem_setup_vqs()). */
#define TMEM_MAX_INVAL		256

static unsigned int poll_us = 50;

static int tmem_set_poll_us(const char *val, const struct kernel_param *kp)
{
	return param_set_uint_minmax(val, kp, 0, 10000);
}

static const struct kernel_param_ops tmem_poll_us_ops = {
	.set = tmem_set_poll_us,
	.get = param_get_uint,
};
module_param_cb(poll_us, &tmem_poll_us_ops, &poll_us, 0644);
MODULE_PARM_DESC(poll_us, "Busy-poll the used ring this long before sleeping (us, 0-10000)");

static unsigned int io_timeout_ms = 30000;

static int tmem_set_io_timeout(const char *val, const struct kernel_param *kp)
{
	return param_set_uint_minmax(val, kp, 100, 3600000);
}

static const struct kernel_param_ops tmem_io_timeout_ops = {
	.set = tmem_set_io_timeout,
	.get = param_get_uint,
};
module_param_cb(io_timeout_ms, &tmem_io_timeout_ops, &io_timeout_ms, 0644);
MODULE_PARM_DESC(io_timeout_ms, "A request unanswered this long marks the device broken (ms, 100-3600000)");

static unsigned long capacity_mb;
module_param(capacity_mb, ulong, 0444);
MODULE_PARM_DESC(capacity_mb, "Swap device size in MiB (0: from the device, else twice the RAM)");

static unsigned int max_queues;
module_param(max_queues, uint, 0444);
MODULE_PARM_DESC(max_queues, "Use at most this many virtqueues (0: one per CPU)");

static unsigned int pool;
module_param(pool, uint, 0444);
MODULE_PARM_DESC(pool, "Pool id used in every request");

static char *backing_dev;
module_param(backing_dev, charp, 0444);
MODULE_PARM_DESC(backing_dev, "Block device for pages the host rejects (tmem0 only)");

/* What the device reads and writes for one request: never on the stack. */
struct tmem_dma {
	struct virtio_tmem_req req;
	u8 status;
} ____cacheline_aligned;

struct tmem_dev;

struct tmem_queue {
	spinlock_t lock;	/* the virtqueue and every field up to compl */
	struct virtqueue *vq;
	struct tmem_dev *dev;
	struct tmem_dma *dma;	/* the synchronous slot's request */
	bool busy;		/* slot claimed */
	bool done;		/* the slot's request came back */
	bool sleeping;		/* the slot's submitter waits for the interrupt */
	u32 used_len;
	unsigned long releases;	/* slot releases so far (tmem_claim's progress) */
	struct tmem_dma *inval;	/* TMEM_MAX_INVAL invalidation buffers */
	unsigned int inval_max;	/* how many of them fit beside the slot's request */
	unsigned int inval_out;	/* buffers posted and not yet reaped */
	DECLARE_BITMAP(inval_used, TMEM_MAX_INVAL);	/* which ones */
	struct completion compl;
	wait_queue_head_t slot_wq;
	char name[16];
};

struct tmem_stats {
	atomic64_t stores;
	atomic64_t fills;
	atomic64_t loads;
	atomic64_t rejects;
	atomic64_t invalidates;
	atomic64_t not_found;
	atomic64_t errors;
	atomic64_t notify_misses;
	atomic64_t slot_frees;
	atomic64_t inval_waits;
	atomic64_t backing_writes;
	atomic64_t backing_reads;
};

struct tmem_dev {
	struct virtio_device *vdev;
	struct gendisk *disk;
	int id;
	unsigned int nq;
	struct tmem_queue *queues;
	u64 capacity;		/* pages */
	u32 caps;
	bool broken;		/* for good; set under every queue lock */
	bool frozen;		/* from freeze to restore; set under every queue lock */
	unsigned long *in_host;		/* slot has a copy in the host */
	unsigned long *in_backing;	/* slot lives on backing_dev */
	unsigned long *inval_busy;	/* slot's slot-free INVALIDATE not completed */
	unsigned long *inval_pending;	/* ... nor posted: left to inval_work */
	wait_queue_head_t inval_wq;	/* an inval_busy bit was cleared */
	struct workqueue_struct *wq;	/* WQ_MEM_RECLAIM: swap-out waits on it */
	struct work_struct inval_work;
	struct work_struct config_work;
	struct work_struct reset_work;
	unsigned long reset_queued;
	struct completion reset_done;
	struct delayed_work backing_work;	/* retries opening backing_dev */
	unsigned int backing_tries;
	void *backing_handle;	/* for tmem_bdev_close() */
	struct block_device *backing;	/* set once, with release semantics */
	struct tmem_stats stats;
};

static int tmem_major;
static DEFINE_IDA(tmem_ida);

static struct tmem_queue *tmem_pick_queue(struct tmem_dev *dev)
{
	return &dev->queues[raw_smp_processor_id() % dev->nq];
}

/* No new request may start: the device is broken, or frozen for suspend. */
static bool tmem_stopped(struct tmem_dev *dev)
{
	return READ_ONCE(dev->broken) || READ_ONCE(dev->frozen);
}

static unsigned long tmem_timeout(void)
{
	return msecs_to_jiffies(READ_ONCE(io_timeout_ms));
}

static void tmem_fill_req(struct tmem_dma *d, u8 op, u64 index, u64 arg)
{
	d->req.op = op;
	d->req.flags = 0;
	d->req.reserved = 0;
	d->req.pool = cpu_to_le32(pool);
	d->req.index = cpu_to_le64(index);
	d->req.arg = cpu_to_le64(arg);
	d->status = TMEM_S_NONE;
}

/* ---- request slot ---------------------------------------------------- */

static bool tmem_try_claim(struct tmem_queue *q)
{
	unsigned long flags;
	bool ok;

	spin_lock_irqsave(&q->lock, flags);
	ok = !q->busy && !q->dev->broken && !q->dev->frozen;
	if (ok)
		q->busy = true;
	spin_unlock_irqrestore(&q->lock, flags);
	return ok;
}

static void tmem_break(struct tmem_dev *dev, const char *why);

/* One try for tmem_claim: true once *got is known (claimed, or stopped). */
static bool tmem_claim_step(struct tmem_queue *q, bool *got)
{
	*got = tmem_try_claim(q);
	return *got || tmem_stopped(q->dev);
}

/*
 * Claim @q's slot. A holder gives up on its own request after io_timeout_ms
 * (and breaks the device), so a slot that is not released once in twice that
 * time means the driver is stuck: the device is declared broken rather than
 * leaving the claimer (and del_gendisk behind it) waiting for ever.
 */
static int tmem_claim(struct tmem_queue *q)
{
	unsigned long seen = READ_ONCE(q->releases);
	bool got = false;

	for (;;) {
		if (wait_event_timeout(q->slot_wq, tmem_claim_step(q, &got), 2 * tmem_timeout()))
			return got ? 0 : -EIO;
		if (READ_ONCE(q->releases) == seen) {
			tmem_break(q->dev, "request slot never released");
			return -EIO;
		}
		seen = READ_ONCE(q->releases);
	}
}

static void tmem_release(struct tmem_queue *q)
{
	unsigned long flags;

	spin_lock_irqsave(&q->lock, flags);
	q->busy = false;
	q->releases++;
	spin_unlock_irqrestore(&q->lock, flags);
	wake_up(&q->slot_wq);
}

/* ---- virtqueue ------------------------------------------------------- */

/* A slot-free INVALIDATE came back: the slot may be written again. */
static void tmem_inval_done(struct tmem_queue *q, struct tmem_dma *d, unsigned int len)
{
	struct tmem_dev *dev = q->dev;
	u64 index = le64_to_cpu(d->req.index);

	__clear_bit(d - q->inval, q->inval_used);
	q->inval_out--;
	if (len < 1 || (d->status != VIRTIO_TMEM_S_OK && d->status != VIRTIO_TMEM_S_NOT_FOUND))
		atomic64_inc(&dev->stats.errors);
	else
		atomic64_inc(&dev->stats.invalidates);
	clear_bit_unlock(index, dev->inval_busy);
	/* Full barrier: a PUT that just saw the bit set is on the queue. */
	if (wq_has_sleeper(&dev->inval_wq))
		wake_up(&dev->inval_wq);
}

/*
 * Called with q->lock held and the device not broken. Callbacks stay enabled
 * while the slot's submitter sleeps (for the next buffer) or invalidations
 * are out (delayed: one interrupt once most of them are back, since nothing
 * but a PUT of the same slot waits for them), so that somebody reaps them.
 */
static void tmem_reap(struct tmem_queue *q)
{
	struct tmem_dma *d;
	unsigned int len;

again:
	while ((d = virtqueue_get_buf(q->vq, &len))) {
		if (d == q->dma) {
			q->done = true;
			q->used_len = len;
		} else {
			tmem_inval_done(q, d, len);
		}
	}
	if (q->sleeping)
		return;
	if (!q->inval_out)
		virtqueue_disable_cb(q->vq);
	else if (!virtqueue_enable_cb_delayed(q->vq))
		goto again;	/* most were back already: no interrupt will come */
}

static void tmem_vq_done(struct virtqueue *vq)
{
	struct tmem_dev *dev = vq->vdev->priv;
	struct tmem_queue *q = &dev->queues[vq->index];
	unsigned long flags;

	spin_lock_irqsave(&q->lock, flags);
	if (!dev->broken)
		tmem_reap(q);
	if (q->done && q->sleeping)
		complete(&q->compl);
	spin_unlock_irqrestore(&q->lock, flags);
}

/* Posts the claimed slot's request; the page goes out for PUT, in for GET. */
static int tmem_post(struct tmem_queue *q, struct page *page, bool page_in)
{
	struct scatterlist hdr, data, st, *sgs[3];
	unsigned int out = 0, in = 0;
	unsigned long flags;
	bool kick = false;
	int err = -EIO;

	sg_init_one(&hdr, &q->dma->req, sizeof(q->dma->req));
	sgs[out++] = &hdr;
	if (page) {
		sg_init_table(&data, 1);
		sg_set_page(&data, page, PAGE_SIZE, 0);
		if (page_in)
			sgs[out + in++] = &data;
		else
			sgs[out++] = &data;
	}
	sg_init_one(&st, &q->dma->status, sizeof(q->dma->status));
	sgs[out + in++] = &st;

	spin_lock_irqsave(&q->lock, flags);
	if (!q->dev->broken) {
		q->done = false;
		/* ATOMIC: only an indirect table is ever allocated here. */
		err = virtqueue_add_sgs(q->vq, sgs, out, in, q->dma, GFP_ATOMIC);
		if (!err)
			kick = virtqueue_kick_prepare(q->vq);
		else
			err = -EIO;
	}
	spin_unlock_irqrestore(&q->lock, flags);
	/* The claimed slot keeps remove() (after del_gendisk) off the queue. */
	if (kick)
		virtqueue_notify(q->vq);
	return err;
}

/*
 * Posts INVALIDATE_PAGE of @index into a free invalidation buffer of @q and
 * returns without waiting; false if @q has none free or takes no requests.
 * Safe in atomic context. The kick happens under the lock, where remove()
 * cannot have deleted the queue (it marks the device broken under it first).
 */
static bool tmem_post_inval(struct tmem_queue *q, u64 index)
{
	struct scatterlist hdr, st, *sgs[2] = { &hdr, &st };
	struct tmem_dev *dev = q->dev;
	unsigned long flags;
	struct tmem_dma *d;
	unsigned int k;
	bool posted = false;

	spin_lock_irqsave(&q->lock, flags);
	if (dev->broken || dev->frozen)
		goto out;
	k = find_first_zero_bit(q->inval_used, q->inval_max);
	if (k >= q->inval_max)
		goto out;
	d = &q->inval[k];
	tmem_fill_req(d, VIRTIO_TMEM_OP_INVALIDATE_PAGE, index, 0);
	sg_init_one(&hdr, &d->req, sizeof(d->req));
	sg_init_one(&st, &d->status, sizeof(d->status));
	if (virtqueue_add_sgs(q->vq, sgs, 1, 1, d, GFP_ATOMIC))
		goto out;
	__set_bit(k, q->inval_used);
	q->inval_out++;
	posted = true;
	if (virtqueue_kick_prepare(q->vq))
		virtqueue_notify(q->vq);
	/* Arms the callback for the invalidations (or keeps a sleeper's). */
	tmem_reap(q);
out:
	spin_unlock_irqrestore(&q->lock, flags);
	return posted;
}

static bool tmem_device_gone(struct tmem_dev *dev)
{
	u8 status = dev->vdev->config->get_status(dev->vdev);

	/* A surprise reset clears DRIVER_OK; a vanished PCI device reads 0xff. */
	return (status & VIRTIO_CONFIG_S_NEEDS_RESET) || !(status & VIRTIO_CONFIG_S_DRIVER_OK);
}

/*
 * Stop using the device: no request is posted after this, waiters are woken
 * and a work item resets the device so that it drops every buffer it holds.
 */
static void tmem_break(struct tmem_dev *dev, const char *why)
{
	unsigned long flags;
	unsigned int i;

	for (i = 0; i < dev->nq; i++) {
		spin_lock_irqsave(&dev->queues[i].lock, flags);
		dev->broken = true;
		if (dev->queues[i].sleeping)
			complete(&dev->queues[i].compl);
		spin_unlock_irqrestore(&dev->queues[i].lock, flags);
		wake_up(&dev->queues[i].slot_wq);
	}
	wake_up(&dev->inval_wq);
	if (!test_and_set_bit(0, &dev->reset_queued)) {
		if (why)
			dev_err(&dev->vdev->dev, "device unusable (%s); all requests now fail\n",
				why);
		queue_work(dev->wq, &dev->reset_work);
	}
}

static void tmem_reset_work(struct work_struct *work)
{
	struct tmem_dev *dev = container_of(work, struct tmem_dev, reset_work);

	virtio_reset_device(dev->vdev);
	complete_all(&dev->reset_done);
}

static void tmem_config_work(struct work_struct *work)
{
	struct tmem_dev *dev = container_of(work, struct tmem_dev, config_work);
	u32 magic;

	if (tmem_stopped(dev))
		return;
	virtio_cread_le(dev->vdev, struct virtio_tmem_config, magic, &magic);
	if (magic != VIRTIO_TMEM_MAGIC || tmem_device_gone(dev))
		tmem_break(dev, "device reset or config changed");
}

static void tmem_config_changed(struct virtio_device *vdev)
{
	struct tmem_dev *dev = vdev->priv;

	schedule_work(&dev->config_work);
}

/* What one look at a queue does besides reaping (see tmem_check). */
enum tmem_step {
	TMEM_POLL,	/* reap only */
	TMEM_ARM,	/* reap; if still not done, mark sleeping and enable callbacks */
	TMEM_DISARM,	/* after a sleep: clear sleeping, reap (which disables callbacks) */
};

/*
 * One look at @q under its lock. Returns whether our request is done and
 * sets *brk when the device is broken (then nothing on the ring is touched:
 * a reset may be under way).
 */
static bool tmem_check(struct tmem_queue *q, enum tmem_step step, bool *brk)
{
	struct tmem_dev *dev = q->dev;
	unsigned long flags;
	bool done;

	spin_lock_irqsave(&q->lock, flags);
	if (step == TMEM_DISARM)
		q->sleeping = false;
	if (!dev->broken) {
		tmem_reap(q);
		if (step == TMEM_ARM && !q->done) {
			q->sleeping = true;
			/* false: buffers arrived meanwhile, no interrupt will come */
			if (!virtqueue_enable_cb(q->vq))
				tmem_reap(q);
		}
	}
	done = q->done;
	*brk = dev->broken;
	spin_unlock_irqrestore(&q->lock, flags);
	return done;
}

/*
 * Wait for the slot's request on @q: poll for poll_us, then sleep on the
 * interrupt, checking the device's health once a second.
 */
static int tmem_wait(struct tmem_queue *q)
{
	struct tmem_dev *dev = q->dev;
	ktime_t start = ktime_get();
	ktime_t poll_end = ktime_add_us(start, READ_ONCE(poll_us));
	ktime_t deadline = ktime_add_ms(start, READ_ONCE(io_timeout_ms));
	bool brk;

	for (;;) {
		if (tmem_check(q, TMEM_POLL, &brk))
			return 0;
		if (brk)
			goto broken;
		if (ktime_after(ktime_get(), poll_end))
			break;
		cpu_relax();
	}

	for (;;) {
		reinit_completion(&q->compl);
		if (!tmem_check(q, TMEM_ARM, &brk) && !brk)
			wait_for_completion_io_timeout(&q->compl, HZ);
		if (tmem_check(q, TMEM_DISARM, &brk))
			return 0;
		if (brk)
			goto broken;
		if (tmem_device_gone(dev))
			tmem_break(dev, "device reset");
		else if (ktime_after(ktime_get(), deadline))
			tmem_break(dev, "request timed out");
	}

broken:
	/* The device may still own our buffers until it has been reset. */
	wait_for_completion(&dev->reset_done);
	return -EIO;
}

/*
 * Post one request on the claimed queue @q and wait for it. Returns 0 with
 * the device's status in *status, or a negative errno.
 */
static int tmem_issue(struct tmem_queue *q, u8 op, u64 index, u64 arg,
		      struct page *page, u8 *status)
{
	int err;

	tmem_fill_req(q->dma, op, index, arg);
	err = tmem_post(q, page, op == VIRTIO_TMEM_OP_GET);
	if (err)
		return err;
	err = tmem_wait(q);
	if (err)
		return err;
	*status = q->dma->status;
	if (*status == TMEM_S_NONE || q->used_len < 1)
		return -EIO;
	return 0;
}

/*
 * One synchronous request: claim @q's slot, post, wait, release. A GET
 * answered OK must have written the whole page. Returns 0 with the device's
 * status in *status, or a negative errno (counted in stats.errors).
 */
static int tmem_request(struct tmem_queue *q, u8 op, u64 index, u64 arg,
			struct page *page, u8 *status)
{
	int err;

	err = tmem_claim(q);
	if (err)
		return err;
	err = tmem_issue(q, op, index, arg, page, status);
	if (!err && op == VIRTIO_TMEM_OP_GET && *status == VIRTIO_TMEM_S_OK &&
	    q->used_len != PAGE_SIZE + 1)
		err = -EIO;
	tmem_release(q);
	if (err)
		atomic64_inc(&q->dev->stats.errors);
	return err;
}

/* ---- backing device -------------------------------------------------- */

struct tmem_backing_io {
	struct work_struct work;
	struct block_device *bdev;
	struct page *page;
	u64 index;
	bool write;
	int ret;
};

static void tmem_backing_io_work(struct work_struct *work)
{
	struct tmem_backing_io *io = container_of(work, struct tmem_backing_io, work);
	struct bio_vec bv;
	struct bio bio;

	bio_init(&bio, io->bdev, &bv, 1,
		 io->write ? REQ_OP_WRITE | REQ_SYNC : REQ_OP_READ);
	bio.bi_iter.bi_sector = io->index << (PAGE_SHIFT - SECTOR_SHIFT);
	__bio_add_page(&bio, io->page, PAGE_SIZE, 0);
	io->ret = submit_bio_wait(&bio);
	bio_uninit(&bio);
}

/*
 * Bios submitted from inside our submit_bio would only be queued on
 * current->bio_list until we return, so the backing I/O runs in a worker.
 */
static int tmem_backing_rw(struct tmem_dev *dev, struct block_device *bdev,
			   struct page *page, u64 index, bool write)
{
	struct tmem_backing_io io = {
		.bdev = bdev, .page = page, .index = index, .write = write,
	};

	INIT_WORK_ONSTACK(&io.work, tmem_backing_io_work);
	queue_work(dev->wq, &io.work);
	flush_work(&io.work);
	destroy_work_on_stack(&io.work);
	if (!io.ret)
		atomic64_inc(write ? &dev->stats.backing_writes : &dev->stats.backing_reads);
	return io.ret;
}

/* ---- page operations ------------------------------------------------- */

/*
 * Before a PUT of @index: no slot-free INVALIDATE of the same slot may be
 * left to overtake it on another queue. One that is not posted yet is taken
 * back (the PUT replaces the old copy, and a rejected PUT drops it); a posted
 * one is waited for, at most io_timeout_ms like any request.
 */
static int tmem_settle_slot(struct tmem_dev *dev, u64 index)
{
	if (!test_bit(index, dev->inval_busy))
		return 0;
	if (test_and_clear_bit(index, dev->inval_pending)) {
		clear_bit_unlock(index, dev->inval_busy);
		return 0;
	}
	atomic64_inc(&dev->stats.inval_waits);
	if (!wait_event_timeout(dev->inval_wq,
				!test_bit(index, dev->inval_busy) || tmem_stopped(dev),
				tmem_timeout()))
		tmem_break(dev, "slot-free invalidation unanswered");
	return test_bit(index, dev->inval_busy) ? -EIO : 0;
}

static bool tmem_same_filled(struct page *page, u64 *value)
{
	const u64 *p = kmap_local_page(page);
	unsigned int i;
	bool same = true;

	for (i = 1; i < PAGE_SIZE / sizeof(*p); i++) {
		if (p[i] != p[0]) {
			same = false;
			break;
		}
	}
	*value = p[0];
	kunmap_local(p);
	return same;
}

static int tmem_write_page(struct tmem_dev *dev, struct page *page, u64 index)
{
	struct block_device *backing;
	struct tmem_queue *q;
	bool fill = false;
	u64 value = 0;
	u8 status;
	int err;

	err = tmem_settle_slot(dev, index);
	if (err)
		return err;
	if (dev->caps & VIRTIO_TMEM_CAP_PUT_FILL)
		fill = tmem_same_filled(page, &value);

	q = tmem_pick_queue(dev);
	if (fill)
		err = tmem_request(q, VIRTIO_TMEM_OP_PUT_FILL, index, value, NULL, &status);
	else
		err = tmem_request(q, VIRTIO_TMEM_OP_PUT, index, 0, page, &status);
	if (err)
		return err;

	switch (status) {
	case VIRTIO_TMEM_S_OK:
		set_bit(index, dev->in_host);
		if (dev->in_backing)
			clear_bit(index, dev->in_backing);
		atomic64_inc(fill ? &dev->stats.fills : &dev->stats.stores);
		return 0;
	case VIRTIO_TMEM_S_REJECTED:
		/* A rejected put also dropped the host's older copy. */
		clear_bit(index, dev->in_host);
		atomic64_inc(&dev->stats.rejects);
		/* Pairs with tmem_open_backing(): the device is opened. */
		backing = smp_load_acquire(&dev->backing);
		if (!backing)
			return -EIO;
		err = tmem_backing_rw(dev, backing, page, index, true);
		if (err) {
			clear_bit(index, dev->in_backing);
			atomic64_inc(&dev->stats.errors);
			return err;
		}
		set_bit(index, dev->in_backing);
		return 0;
	default:
		atomic64_inc(&dev->stats.errors);
		return -EIO;
	}
}

static int tmem_read_page(struct tmem_dev *dev, struct page *page, u64 index)
{
	struct block_device *backing;
	u8 status;
	int err;

	if (dev->in_backing && test_bit(index, dev->in_backing)) {
		/* Set after backing was published: pairs with tmem_open_backing(). */
		backing = smp_load_acquire(&dev->backing);
		return tmem_backing_rw(dev, backing, page, index, false);
	}
	if (!test_bit(index, dev->in_host)) {
		/* Never written (or discarded): reads as zeroes. */
		memzero_page(page, 0, PAGE_SIZE);
		return 0;
	}

	err = tmem_request(tmem_pick_queue(dev), VIRTIO_TMEM_OP_GET, index, 0, page, &status);
	if (err)
		return err;
	switch (status) {
	case VIRTIO_TMEM_S_OK:
		atomic64_inc(&dev->stats.loads);
		return 0;
	case VIRTIO_TMEM_S_NOT_FOUND:
		/* We stored it and the host lost it: never hand out wrong data. */
		atomic64_inc(&dev->stats.not_found);
		return -EIO;
	default:
		atomic64_inc(&dev->stats.errors);
		return -EIO;
	}
}

/*
 * Forget whatever an earlier boot left in our pool before the first request
 * of this one (docs/protocol.md section 6): the host cannot always tell a
 * reboot from a pause, so the driver says so.
 */
static int tmem_invalidate_pool(struct tmem_dev *dev)
{
	u8 status;
	int err;

	err = tmem_request(&dev->queues[0], VIRTIO_TMEM_OP_INVALIDATE_POOL, 0, 0, NULL, &status);
	if (!err && status != VIRTIO_TMEM_S_OK)
		err = -EIO;
	return err;
}

/* Sleeping invalidation of one slot (discard, write-zeroes, missed notifies). */
static int tmem_invalidate_page(struct tmem_dev *dev, u64 index)
{
	u8 status;
	int err;

	if (dev->in_backing)
		clear_bit(index, dev->in_backing);
	if (!test_bit(index, dev->in_host))
		return 0;
	err = tmem_request(tmem_pick_queue(dev), VIRTIO_TMEM_OP_INVALIDATE_PAGE, index, 0, NULL,
			   &status);
	if (err)
		return err;
	if (status != VIRTIO_TMEM_S_OK && status != VIRTIO_TMEM_S_NOT_FOUND) {
		atomic64_inc(&dev->stats.errors);
		return -EIO;
	}
	clear_bit(index, dev->in_host);
	atomic64_inc(&dev->stats.invalidates);
	return 0;
}

/* Posts INVALIDATE_PAGE of @index on the first queue with a free buffer. */
static bool tmem_post_inval_any(struct tmem_dev *dev, u64 index)
{
	unsigned int i, first = raw_smp_processor_id();

	for (i = 0; i < dev->nq; i++)
		if (tmem_post_inval(&dev->queues[(first + i) % dev->nq], index))
			return true;
	return false;
}

/* One try for tmem_inval_work: true once posted, or posting is stopped. */
static bool tmem_inval_step(struct tmem_dev *dev, u64 index, bool *posted)
{
	*posted = tmem_post_inval_any(dev, index);
	return *posted || tmem_stopped(dev);
}

/*
 * Slot-free invalidations that found every buffer out. The worker posts them
 * as buffers come free (their completions clear inval_busy, as for the
 * notify's own posts). Buffers that do not come free in twice io_timeout_ms
 * mean the host stopped answering: the device is declared broken.
 */
static void tmem_inval_work(struct work_struct *work)
{
	struct tmem_dev *dev = container_of(work, struct tmem_dev, inval_work);
	bool posted = false;
	unsigned long i;

	for_each_set_bit(i, dev->inval_pending, dev->capacity) {
		if (!test_and_clear_bit(i, dev->inval_pending))
			continue;	/* a PUT of the slot took it back */
		if (!wait_event_timeout(dev->inval_wq, tmem_inval_step(dev, i, &posted),
					2 * tmem_timeout()))
			tmem_break(dev, "slot-free invalidations unanswered");
		if (!posted) {
			/* Frozen: tmem_restore() or a refused freeze settles it. */
			if (!READ_ONCE(dev->broken))
				set_bit(i, dev->inval_pending);
			return;
		}
	}
}

/*
 * The swap layer freed a slot. Called under a swap spinlock, possibly with
 * interrupts off: it only posts and never waits. The INVALIDATE goes into a
 * free invalidation buffer of the first queue that has one, starting with
 * this CPU's; when every buffer is out, the slot is left to inval_work
 * (counted in notify_misses).
 */
static void tmem_slot_free_notify(struct block_device *bdev, unsigned long index)
{
	struct tmem_dev *dev = bdev->bd_disk->private_data;

	if (index >= dev->capacity)
		return;
	atomic64_inc(&dev->stats.slot_frees);
	if (dev->in_backing)
		clear_bit(index, dev->in_backing);
	if (!test_and_clear_bit(index, dev->in_host) || READ_ONCE(dev->broken))
		return;

	set_bit(index, dev->inval_busy);
	if (tmem_post_inval_any(dev, index))
		return;
	atomic64_inc(&dev->stats.notify_misses);
	set_bit(index, dev->inval_pending);
	queue_work(dev->wq, &dev->inval_work);
}

/* ---- block device ---------------------------------------------------- */

static int tmem_rw_bio(struct tmem_dev *dev, struct bio *bio)
{
	bool write = op_is_write(bio_op(bio));
	struct bvec_iter iter;
	struct bio_vec bv;
	u64 index;
	int err;

	if (bio->bi_iter.bi_sector & (PAGE_SECTORS - 1))
		return -EIO;
	bio_for_each_segment(bv, bio, iter) {
		index = iter.bi_sector >> (PAGE_SHIFT - SECTOR_SHIFT);
		/* The 4 KiB logical block size makes every segment a whole page. */
		if (bv.bv_len != PAGE_SIZE || bv.bv_offset || index >= dev->capacity)
			return -EIO;
		if (write)
			err = tmem_write_page(dev, bv.bv_page, index);
		else
			err = tmem_read_page(dev, bv.bv_page, index);
		if (err)
			return err;
	}
	return 0;
}

static int tmem_discard_bio(struct tmem_dev *dev, struct bio *bio)
{
	u64 first = DIV_ROUND_UP_ULL(bio->bi_iter.bi_sector, PAGE_SECTORS);
	u64 end = (bio->bi_iter.bi_sector + bio_sectors(bio)) >> (PAGE_SHIFT - SECTOR_SHIFT);
	u64 index;
	int err;

	/* Partial pages at either end are left alone, as a discard may. */
	end = min(end, dev->capacity);
	for (index = first; index < end; index++) {
		err = tmem_invalidate_page(dev, index);
		if (err)
			return err;
		cond_resched();
	}
	return 0;
}

static void tmem_submit_bio(struct bio *bio)
{
	struct tmem_dev *dev = bio->bi_bdev->bd_disk->private_data;
	int err;

	switch (bio_op(bio)) {
	case REQ_OP_READ:
	case REQ_OP_WRITE:
		err = tmem_rw_bio(dev, bio);
		break;
	case REQ_OP_DISCARD:
	case REQ_OP_WRITE_ZEROES:
		err = tmem_discard_bio(dev, bio);
		break;
	case REQ_OP_FLUSH:
		err = 0;	/* every write is already in the host */
		break;
	default:
		err = -EOPNOTSUPP;
		break;
	}
	bio->bi_status = errno_to_blk_status(err);
	bio_endio(bio);
}

#if TMEM_HAVE_RW_PAGE
/*
 * Swap's synchronous path on kernels that have rw_page (see compat.h).
 * On failure the caller retries through a bio, which reports the error.
 */
static int tmem_rw_page(struct block_device *bdev, sector_t sector,
			struct page *page, enum req_op op)
{
	struct tmem_dev *dev = bdev->bd_disk->private_data;
	u64 index = sector >> (PAGE_SHIFT - SECTOR_SHIFT);
	int err;

	if (PageTransHuge(page) || (sector & (PAGE_SECTORS - 1)) || index >= dev->capacity)
		return -EOPNOTSUPP;
	if (op_is_write(op))
		err = tmem_write_page(dev, page, index);
	else
		err = tmem_read_page(dev, page, index);
	if (!err)
		page_endio(page, op_is_write(op), 0);
	return err;
}
#endif

static void tmem_free_dev(struct tmem_dev *dev)
{
	unsigned int i;

	if (dev->wq)
		destroy_workqueue(dev->wq);
	if (dev->backing_handle)
		tmem_bdev_close(dev->backing_handle, dev);
	kvfree(dev->in_host);
	kvfree(dev->in_backing);
	kvfree(dev->inval_busy);
	kvfree(dev->inval_pending);
	if (dev->queues) {
		for (i = 0; i < dev->nq; i++) {
			kfree(dev->queues[i].dma);
			kfree(dev->queues[i].inval);
		}
	}
	kfree(dev->queues);
	if (dev->id >= 0)
		ida_free(&tmem_ida, dev->id);
	kfree(dev);
}

/* Last reference to the disk: swap may keep it open after the device left. */
static void tmem_free_disk(struct gendisk *disk)
{
	tmem_free_dev(disk->private_data);
}

static const struct block_device_operations tmem_fops = {
	.owner = THIS_MODULE,
	.submit_bio = tmem_submit_bio,
#if TMEM_HAVE_RW_PAGE
	.rw_page = tmem_rw_page,
#endif
	.swap_slot_free_notify = tmem_slot_free_notify,
	.free_disk = tmem_free_disk,
};

/* ---- sysfs ----------------------------------------------------------- */

#define TMEM_STAT_ATTR(_name)						\
static ssize_t _name##_show(struct device *d,				\
			    struct device_attribute *attr, char *buf)	\
{									\
	struct tmem_dev *dev = dev_to_disk(d)->private_data;		\
									\
	return sysfs_emit(buf, "%lld\n",				\
			  (long long)atomic64_read(&dev->stats._name));	\
}									\
static DEVICE_ATTR_RO(_name)

TMEM_STAT_ATTR(stores);
TMEM_STAT_ATTR(fills);
TMEM_STAT_ATTR(loads);
TMEM_STAT_ATTR(rejects);
TMEM_STAT_ATTR(invalidates);
TMEM_STAT_ATTR(not_found);
TMEM_STAT_ATTR(errors);
TMEM_STAT_ATTR(notify_misses);
TMEM_STAT_ATTR(slot_frees);
TMEM_STAT_ATTR(inval_waits);
TMEM_STAT_ATTR(backing_writes);
TMEM_STAT_ATTR(backing_reads);

static ssize_t queues_show(struct device *d, struct device_attribute *attr, char *buf)
{
	struct tmem_dev *dev = dev_to_disk(d)->private_data;

	return sysfs_emit(buf, "%u\n", dev->nq);
}
static DEVICE_ATTR_RO(queues);

static struct attribute *tmem_attrs[] = {
	&dev_attr_stores.attr,
	&dev_attr_fills.attr,
	&dev_attr_loads.attr,
	&dev_attr_rejects.attr,
	&dev_attr_invalidates.attr,
	&dev_attr_not_found.attr,
	&dev_attr_errors.attr,
	&dev_attr_notify_misses.attr,
	&dev_attr_slot_frees.attr,
	&dev_attr_inval_waits.attr,
	&dev_attr_backing_writes.attr,
	&dev_attr_backing_reads.attr,
	&dev_attr_queues.attr,
	NULL,
};

static const struct attribute_group tmem_attr_group = {
	.name = "tmem",
	.attrs = tmem_attrs,
};

static const struct attribute_group *tmem_attr_groups[] = {
	&tmem_attr_group,
	NULL,
};

/* ---- probe / remove -------------------------------------------------- */

/*
 * Opens backing_dev and publishes it in dev->backing. -ENOENT and the like
 * are worth retrying: the device may not have been probed yet.
 */
static int tmem_open_backing(struct tmem_dev *dev)
{
	sector_t need = dev->capacity << (PAGE_SHIFT - SECTOR_SHIFT);
	struct block_device *bdev;
	void *handle;

	bdev = tmem_bdev_open(backing_dev, dev, &handle);
	if (IS_ERR(bdev))
		return PTR_ERR(bdev);
	if (bdev_nr_sectors(bdev) < need) {
		tmem_bdev_close(handle, dev);
		dev_err(&dev->vdev->dev, "backing_dev %s is smaller than %llu pages; not used\n",
			backing_dev, dev->capacity);
		return -ENOSPC;
	}
	dev->backing_handle = handle;
	/* Publishes the opened device to writers that load it with acquire. */
	smp_store_release(&dev->backing, bdev);
	dev_info(&dev->vdev->dev, "tmem%d: backing_dev %s\n", dev->id, backing_dev);
	return 0;
}

#define TMEM_BACKING_TRIES	60

/* Retries backing_dev once a second for a minute after probe. */
static void tmem_backing_work(struct work_struct *work)
{
	struct tmem_dev *dev = container_of(to_delayed_work(work), struct tmem_dev,
					    backing_work);
	int err;

	if (READ_ONCE(dev->broken))
		return;
	err = tmem_open_backing(dev);
	if (!err || err == -ENOSPC)
		return;
	if (++dev->backing_tries < TMEM_BACKING_TRIES) {
		schedule_delayed_work(&dev->backing_work, HZ);
		return;
	}
	dev_err(&dev->vdev->dev, "backing_dev %s still unusable (%d); running without it\n",
		backing_dev, err);
}

/*
 * Creates the virtqueues (at probe and on restore). Each queue keeps room
 * for the slot's request (at most 3 descriptors) beside its invalidation
 * buffers (2 descriptors each without indirect descriptors).
 */
static int tmem_setup_vqs(struct tmem_dev *dev)
{
	struct virtqueue **vqs;
	const char **names;
	unsigned int i, size;
	int err = -ENOMEM;

	vqs = kcalloc(dev->nq, sizeof(*vqs), GFP_KERNEL);
	names = kcalloc(dev->nq, sizeof(*names), GFP_KERNEL);
	if (!vqs || !names)
		goto out;
	for (i = 0; i < dev->nq; i++)
		names[i] = dev->queues[i].name;
	err = tmem_find_vqs(dev->vdev, dev->nq, vqs, tmem_vq_done, names);
	if (err)
		goto out;
	for (i = 0; i < dev->nq; i++) {
		struct tmem_queue *q = &dev->queues[i];

		q->vq = vqs[i];
		bitmap_zero(q->inval_used, TMEM_MAX_INVAL);
		q->inval_out = 0;
		size = virtqueue_get_vring_size(vqs[i]);
		q->inval_max = size > 3 ? min_t(unsigned int, (size - 3) / 2, TMEM_MAX_INVAL) : 0;
		/* Submitters poll; callbacks are enabled only to sleep. */
		virtqueue_disable_cb(vqs[i]);
	}
out:
	kfree(names);
	kfree(vqs);
	return err;
}

static int tmem_alloc_disk(struct tmem_dev *dev)
{
	struct gendisk *disk;
	int err;

	disk = tmem_blk_alloc_disk();
	if (IS_ERR(disk))
		return PTR_ERR(disk);
	disk->major = tmem_major;
	disk->first_minor = dev->id;
	disk->minors = 1;
	disk->flags |= GENHD_FL_NO_PART;
	disk->fops = &tmem_fops;
	disk->private_data = dev;
	snprintf(disk->disk_name, sizeof(disk->disk_name), "tmem%d", dev->id);
	set_capacity(disk, dev->capacity << (PAGE_SHIFT - SECTOR_SHIFT));

	err = device_add_disk(&dev->vdev->dev, disk, tmem_attr_groups);
	if (err) {
		put_disk(disk);
		return err;
	}
	dev->disk = disk;
	return 0;
}

static int tmem_probe(struct virtio_device *vdev)
{
	struct tmem_dev *dev;
	u32 magic, page_size, caps;
	u16 version, num_queues;
	u64 capacity;
	unsigned int i;
	int err;

	if (!vdev->config->get) {
		dev_err(&vdev->dev, "config space is not readable\n");
		return -EINVAL;
	}
	virtio_cread_le(vdev, struct virtio_tmem_config, magic, &magic);
	virtio_cread_le(vdev, struct virtio_tmem_config, version, &version);
	if (magic != VIRTIO_TMEM_MAGIC || version != VIRTIO_TMEM_VERSION) {
		dev_err(&vdev->dev, "not a tmem v%d device (magic %#x version %u)\n",
			VIRTIO_TMEM_VERSION, magic, version);
		return -ENODEV;
	}
	virtio_cread_le(vdev, struct virtio_tmem_config, num_queues, &num_queues);
	virtio_cread_le(vdev, struct virtio_tmem_config, page_size, &page_size);
	virtio_cread_le(vdev, struct virtio_tmem_config, caps, &caps);
	virtio_cread_le(vdev, struct virtio_tmem_config, capacity_pages, &capacity);
	if (page_size != VIRTIO_TMEM_PAGE_SIZE || PAGE_SIZE != VIRTIO_TMEM_PAGE_SIZE) {
		dev_err(&vdev->dev, "page size %u unsupported\n", page_size);
		return -ENODEV;
	}

	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev)
		return -ENOMEM;
	dev->vdev = vdev;
	dev->caps = caps;
	dev->id = ida_alloc_max(&tmem_ida, MINORMASK, GFP_KERNEL);
	if (dev->id < 0) {
		err = dev->id;
		goto err_free;
	}
	if (capacity_mb)
		capacity = (u64)min_t(unsigned long, capacity_mb,
				      TMEM_MAX_PAGES >> (20 - PAGE_SHIFT)) << (20 - PAGE_SHIFT);
	else if (!capacity)
		capacity = 2 * (u64)totalram_pages();
	if (capacity > TMEM_MAX_PAGES) {
		dev_warn(&vdev->dev, "capacity of %llu pages clamped to %llu\n",
			 capacity, TMEM_MAX_PAGES);
		capacity = TMEM_MAX_PAGES;
	}
	dev->capacity = capacity;

	dev->nq = max_t(unsigned int, num_queues, 1);
	dev->nq = min_t(unsigned int, dev->nq, nr_cpu_ids);
	if (max_queues)
		dev->nq = min(dev->nq, max_queues);
	init_waitqueue_head(&dev->inval_wq);
	INIT_WORK(&dev->inval_work, tmem_inval_work);
	INIT_DELAYED_WORK(&dev->backing_work, tmem_backing_work);
	INIT_WORK(&dev->config_work, tmem_config_work);
	INIT_WORK(&dev->reset_work, tmem_reset_work);
	init_completion(&dev->reset_done);

	err = -ENOMEM;
	dev->queues = kcalloc(dev->nq, sizeof(*dev->queues), GFP_KERNEL);
	if (!dev->queues)
		goto err_free;
	for (i = 0; i < dev->nq; i++) {
		struct tmem_queue *q = &dev->queues[i];

		spin_lock_init(&q->lock);
		init_completion(&q->compl);
		init_waitqueue_head(&q->slot_wq);
		q->dev = dev;
		snprintf(q->name, sizeof(q->name), "tmem.%u", i);
		/* Header and status are DMA targets: never on the stack. */
		q->dma = kzalloc(sizeof(*q->dma), GFP_KERNEL);
		q->inval = kcalloc(TMEM_MAX_INVAL, sizeof(*q->inval), GFP_KERNEL);
		if (!q->dma || !q->inval)
			goto err_free;
	}
	dev->in_host = kvcalloc(BITS_TO_LONGS(dev->capacity), sizeof(long), GFP_KERNEL);
	dev->inval_busy = kvcalloc(BITS_TO_LONGS(dev->capacity), sizeof(long), GFP_KERNEL);
	dev->inval_pending = kvcalloc(BITS_TO_LONGS(dev->capacity), sizeof(long), GFP_KERNEL);
	if (!dev->in_host || !dev->inval_busy || !dev->inval_pending)
		goto err_free;
	/* Reclaim may wait on this queue, so it needs a rescuer thread. */
	dev->wq = alloc_workqueue("tmem%d", WQ_MEM_RECLAIM | WQ_UNBOUND, 0, dev->id);
	if (!dev->wq)
		goto err_free;
	if (backing_dev && *backing_dev && dev->id == 0) {
		dev->in_backing = kvcalloc(BITS_TO_LONGS(dev->capacity), sizeof(long),
					   GFP_KERNEL);
		if (!dev->in_backing)
			goto err_free;
		/* Not there (yet) is no reason to refuse the device. */
		err = tmem_open_backing(dev);
		if (err && err != -ENOSPC)
			dev_warn(&vdev->dev, "backing_dev %s not usable yet (%d); retrying for %d s\n",
				 backing_dev, err, TMEM_BACKING_TRIES);
	}

	vdev->priv = dev;
	err = tmem_setup_vqs(dev);
	if (err)
		goto err_free;

	/* The VMM starts the backend on DRIVER_OK: before the first request. */
	virtio_device_ready(vdev);

	err = tmem_invalidate_pool(dev);
	if (err) {
		dev_err(&vdev->dev, "cannot clear pool %u: %d\n", pool, err);
		goto err_reset;
	}

	err = tmem_alloc_disk(dev);
	if (err)
		goto err_reset;

	if (dev->in_backing && !dev->backing)
		schedule_delayed_work(&dev->backing_work, HZ);
	dev_info(&vdev->dev, "tmem%d: %llu MiB, %u queue(s), %u invalidation buffers each, caps %#x%s%s\n",
		 dev->id, dev->capacity >> (20 - PAGE_SHIFT), dev->nq, dev->queues[0].inval_max,
		 caps, dev->backing ? ", backing_dev " : "", dev->backing ? backing_dev : "");
	return 0;

err_reset:
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
err_free:
	vdev->priv = NULL;
	tmem_free_dev(dev);
	return err;
}

static void tmem_remove(struct virtio_device *vdev)
{
	struct tmem_dev *dev = vdev->priv;
	unsigned int openers = disk_openers(dev->disk);

	if (openers)
		dev_crit(&vdev->dev,
			 "tmem%d unbound while open %u time(s), swap is probably on it: the %u pages the host holds are lost, reading them fails\n",
			 dev->id, openers, bitmap_weight(dev->in_host, dev->capacity));
	cancel_delayed_work_sync(&dev->backing_work);
	/* No new bios after this; it waits for the ones in flight. */
	del_gendisk(dev->disk);
	cancel_work_sync(&dev->config_work);
	/* Fail anything that still arrives (slot-free notifies) and reset. */
	tmem_break(dev, NULL);
	flush_work(&dev->reset_work);
	cancel_work_sync(&dev->config_work);
	cancel_work_sync(&dev->inval_work);
	flush_workqueue(dev->wq);
	vdev->config->del_vqs(vdev);
	vdev->priv = NULL;
	/* dev is freed by tmem_free_disk once swap has closed the disk too. */
	put_disk(dev->disk);
}

/* Sets or clears dev->frozen under every queue lock and wakes all waiters. */
static void tmem_set_frozen(struct tmem_dev *dev, bool frozen)
{
	unsigned long flags;
	unsigned int i;

	for (i = 0; i < dev->nq; i++) {
		spin_lock_irqsave(&dev->queues[i].lock, flags);
		dev->frozen = frozen;
		spin_unlock_irqrestore(&dev->queues[i].lock, flags);
		wake_up(&dev->queues[i].slot_wq);
	}
	wake_up(&dev->inval_wq);
}

/* No slot claimed and no invalidation out on any queue. */
static bool tmem_quiet(struct tmem_dev *dev)
{
	unsigned long flags;
	unsigned int i;
	bool quiet = true;

	for (i = 0; i < dev->nq && quiet; i++) {
		spin_lock_irqsave(&dev->queues[i].lock, flags);
		quiet = !dev->queues[i].busy && !dev->queues[i].inval_out;
		spin_unlock_irqrestore(&dev->queues[i].lock, flags);
	}
	return quiet;
}

/*
 * Suspend or hibernation. On resume virtio resets the device, and a reset
 * drops every page the host holds (docs/protocol.md section 6), so a freeze
 * while the host holds pages the guest may read back would lose them
 * silently. It is refused instead (-EBUSY aborts the suspend cleanly); swap
 * off the device first, or use the suspend with the pages in RAM or on the
 * backing device. With no page held, the device is quiesced, reset and its
 * queues deleted; tmem_restore() sets it up again.
 */
static int tmem_freeze(struct virtio_device *vdev)
{
	struct tmem_dev *dev = vdev->priv;
	unsigned long deadline;
	unsigned int held;

	/* New requests fail from here on; the ones in flight finish. */
	tmem_set_frozen(dev, true);
	deadline = jiffies + tmem_timeout();
	while (!tmem_quiet(dev) && !READ_ONCE(dev->broken) && time_before(jiffies, deadline))
		usleep_range(500, 1000);
	cancel_work_sync(&dev->inval_work);
	cancel_work_sync(&dev->config_work);
	flush_work(&dev->reset_work);

	held = READ_ONCE(dev->broken) ? 0 : bitmap_weight(dev->in_host, dev->capacity);
	if (held || (!READ_ONCE(dev->broken) && !tmem_quiet(dev))) {
		tmem_set_frozen(dev, false);
		if (!bitmap_empty(dev->inval_pending, dev->capacity))
			queue_work(dev->wq, &dev->inval_work);
		/* An error, like the PM core's own report of the failed suspend. */
		if (held)
			dev_err(&vdev->dev,
				"suspend refused: the host holds %u pages of tmem%d, and the device reset on resume would drop them\n",
				held, dev->id);
		else
			dev_err(&vdev->dev, "suspend refused: tmem%d requests still in flight\n",
				dev->id);
		return -EBUSY;
	}
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
	return 0;
}

static int tmem_restore(struct virtio_device *vdev)
{
	struct tmem_dev *dev = vdev->priv;
	int err;

	err = tmem_setup_vqs(dev);
	if (err) {
		tmem_break(dev, "cannot set up the queues after resume");
		return err;
	}
	virtio_device_ready(vdev);
	if (READ_ONCE(dev->broken))
		return 0;
	/* The reset dropped whatever invalidations were still to be done. */
	bitmap_zero(dev->inval_pending, dev->capacity);
	bitmap_zero(dev->inval_busy, dev->capacity);
	tmem_set_frozen(dev, false);
	err = tmem_invalidate_pool(dev);
	if (err)
		dev_err(&vdev->dev, "cannot clear pool %u after resume: %d\n", pool, err);
	return 0;
}

static const struct virtio_device_id tmem_id_table[] = {
	{ VIRTIO_ID_TMEM, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, tmem_id_table);

static struct virtio_driver tmem_driver = {
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = tmem_id_table,
	.probe = tmem_probe,
	.remove = tmem_remove,
	.config_changed = tmem_config_changed,
#ifdef CONFIG_PM_SLEEP
	.freeze = tmem_freeze,
	.restore = tmem_restore,
#endif
};

static int __init tmem_init(void)
{
	int err;

	tmem_major = register_blkdev(0, "tmem");
	if (tmem_major < 0)
		return tmem_major;
	err = register_virtio_driver(&tmem_driver);
	if (err)
		unregister_blkdev(tmem_major, "tmem");
	return err;
}

static void __exit tmem_exit(void)
{
	unregister_virtio_driver(&tmem_driver);
	unregister_blkdev(tmem_major, "tmem");
	ida_destroy(&tmem_ida);
}

module_init(tmem_init);
module_exit(tmem_exit);

MODULE_DESCRIPTION("Transcendent memory swap device over virtio (vhost-user-tmem)");
MODULE_LICENSE("GPL");
